"""Import many LoRAs at once: fetch -> check -> restyle (-> index, later), resumable at every step.

A source is either a YAML/JSON list of Civitai model-version ids (``[60568, "19065", {id: 42314,
slug: chinese_ink, sha256: ...}, "https://civitai.com/models/1?modelVersionId=2"]``) or a folder of
``.safetensors`` files. For each LoRA:

1. **fetch**: a Civitai id is downloaded from ``https://civitai.com/api/download/models/<id>`` with
   :func:`lorafind_utils.core.download.download` (resumable ``.part``, SHA-256 while streaming, atomic; the
   token, from ``$CIVITAI_TOKEN``, travels only on that allow-listed path, to Civitai's hosts); a
   folder's file is hard-linked (or copied) in. Either way it lands at ``<dest>/loras/<slug>.safetensors``.
2. **check**: what ``lorafind lora check`` does -- :func:`~lorafind_utils.models.loras.inspect_lora` (never
   unpickles) and :func:`~lorafind_utils.models.loras.check_lora_against_model` on the profile's weight-free
   skeletons (:func:`~lorafind_utils.models.pipelines.base_skeletons`). A folder's file is checked where it is,
   before anything is linked; a refused download is moved to ``loras/quarantine/``.
3. **restyle**: stage 01 (:func:`~lorafind_utils.stages.synthesis.synthesize`, engine ``local`` or ``ray``) on
   every LoRA that passed, into ``<dest>/synth`` (one folder for the whole import).
4. **index** (later): ``on_restyled(slug, status, synth_dir, manifest)`` is called for each restyled
   LoRA not yet indexed; when it returns, the LoRA's step becomes ``indexed``.

Every LoRA has a status file ``<dest>/status/<slug>.json`` (written atomically) whose ``status`` is
``ok``, ``refused: <LoraError message>`` (not a usable SD1.5 LoRA: never retried; delete the status
file to try again) or ``failed: <step>: <error>`` (a download error, a crash: retried on the next
run), and whose ``step`` is the last one done (``fetched``, ``checked``, ``restyled``, ``indexed``).
One bad LoRA never stops the others; only a full disk, a second writer or Ctrl-C stops the run, and a
rerun resumes each LoRA where it stopped. ``<dest>/summary.json`` counts the outcomes and
``<dest>/catalog.yaml`` is a catalog of the LoRAs that passed (with ``lora_dir: <dest>/loras``, a
profile can use it as it is).

Layout::

    <dest>/                      default <runs_dir>/imports/<source name>
        loras/<slug>.safetensors   (+ quarantine/, + .part files of interrupted downloads)
        status/<slug>.json
        catalog.yaml  summary.json
        synth/                     stage 01's folder: params.json, <set>/<slug>/<image>.png, manifest.json
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from lorafind_utils.core import layout
from lorafind_utils.core.config import SLUG
from lorafind_utils.core.download import (
    TOKEN_ENV,
    DiskFullError,
    FetchError,
    display_url,
    download,
    quarantine,
    read_json_object,
    redact,
)
from lorafind_utils.core.files import RunLocked, atomic_path, run_lock, sha256_file, write_json_atomic
from lorafind_utils.models.loras import PICKLE_SUFFIXES, LoraError, check_lora_against_model, inspect_lora

#: Civitai's download endpoint for a model version (``<base>/<id>``)
CIVITAI_DOWNLOAD = "https://civitai.com/api/download/models"
#: the steps a LoRA goes through, in order (its status file's ``step`` is the last one done)
STEPS = ("fetched", "checked", "restyled", "indexed")
#: the files a folder source contributes (pickles too: they are refused, with a reason, not ignored)
LORA_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES

_VERSION_IN_URL = re.compile(r"(?:modelVersionId=|/api/download/models/|/model-versions/)(\d+)")


def import_dir(cfg: dict, source: str | Path) -> Path:
    """The default folder of an import: ``<runs_dir>/imports/<source's name>``."""
    return layout.import_dir(cfg, slugify(Path(source).stem or "import"))


def slugify(name: str, max_len: int = 128) -> str:
    """A catalog slug (:data:`lorafind_utils.core.config.SLUG`) made from a file or model name: runs of other
    characters become ``_``, no leading ``.``/``_``/``-``, at most ``max_len`` characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)[:max_len].rstrip("._-") or "lora"
    assert SLUG.fullmatch(s), s
    return s


def file_slugs(names: list[str]) -> dict[str, str]:
    """{file name: slug} for a folder's files, stable across runs: a file's stem when that is already a
    valid, unused slug, else the sanitized stem + ``-`` + 8 hex digits of the file name's SHA-1.
    ``.safetensors`` files get first pick, so ``x.safetensors`` keeps ``x`` beside ``x.ckpt``."""
    out, taken = {}, set()
    for name in sorted(names, key=lambda n: (Path(n).suffix.lower() != ".safetensors", n)):
        stem = Path(name).stem
        slug = slugify(stem)
        if slug != stem or slug in taken:
            slug = f"{slugify(stem, 119)}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        taken.add(slug)
        out[name] = slug
    return out


def _version_id(item, where: str) -> int:
    if isinstance(item, bool):
        raise ValueError(f"{where}: {item!r} is not a Civitai model-version id")
    if isinstance(item, int) and item > 0:
        return item
    if isinstance(item, str):
        s = item.strip()
        if s.isdigit() and int(s) > 0:
            return int(s)
        m = _VERSION_IN_URL.search(s)
        if m:
            return int(m.group(1))
    raise ValueError(f"{where}: {item!r} is not a Civitai model-version id (a number, or a URL with "
                     "modelVersionId=<id> or /api/download/models/<id>)")


def read_source(source: str | Path) -> tuple[str, list[dict]]:
    """The LoRAs a source names: (``civitai`` | ``folder``, entries in import order).

    An entry is {slug, name, source: {civitai_version_id} | {file}, sha256?}.

    :raises ValueError: a source that is neither a folder nor a list file, a malformed list, an
        invalid or duplicate slug or id (naming the entry).
    """
    p = Path(source).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if not f.name.startswith(".") and f.suffix.lower() in LORA_SUFFIXES
                 and f.is_file()]
        slugs = file_slugs([f.name for f in files])
        return "folder", [{"slug": slugs[f.name], "name": f.stem, "source": {"file": str(f.absolute())}} for f in files]
    if not p.is_file():
        raise ValueError(f"{p}: no such folder or file; give a folder of .safetensors files or a YAML/JSON list "
                         "of Civitai model-version ids")
    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML/JSON ({e})") from None
    items = data.get("loras", data.get("versions")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{p}: expected a list of Civitai model-version ids (or a mapping with a 'loras' list)")
    out, seen_slugs, seen_ids = [], set(), set()
    for i, item in enumerate(items):
        where = f"{p}: entry {i + 1}"
        extra = {}
        if isinstance(item, dict):
            raw = next(
                (item[k] for k in ("civitai_version_id", "id", "version_id", "url") if item.get(k) is not None), None
            )
            vid = _version_id(raw, where)
            slug = item.get("slug") or f"civitai_{vid}"
            if not isinstance(slug, str) or not SLUG.fullmatch(slug):
                raise ValueError(f"{where}: slug {slug!r} is not a plain name (letters, digits, '.', '_', '-')")
            if item.get("sha256"):
                extra["sha256"] = str(item["sha256"]).lower()
            name = str(item.get("name") or item.get("short") or slug)
        else:
            vid = _version_id(item, where)
            slug, name = f"civitai_{vid}", f"Civitai {vid}"
        if vid in seen_ids:
            raise ValueError(f"{where}: Civitai model version {vid} is listed twice")
        if slug in seen_slugs:
            raise ValueError(f"{where}: duplicate slug '{slug}'")
        seen_ids.add(vid)
        seen_slugs.add(slug)
        out.append({"slug": slug, "name": name, "source": {"civitai_version_id": vid}, **extra})
    return "civitai", out


def _step_done(st: dict, step: str) -> bool:
    return st.get("step") in STEPS and STEPS.index(st["step"]) >= STEPS.index(step)


class _Import:
    """One run of :func:`import_catalog` (its folders, the token, the model skeletons)."""

    def __init__(self, cfg: dict, dest: Path, token: str | None, download_base: str, progress: bool):
        self.cfg, self.dest, self.token, self.base, self.progress = cfg, dest, token, download_base, progress
        self.lora_dir, self.status_dir = layout.lora_dir(_import_profile(cfg, dest)), dest / "status"
        self._skeletons = None
        self._session = None

    # --- status files -------------------------------------------------------------------------
    def status_path(self, slug: str) -> Path:
        return self.status_dir / f"{slug}.json"

    def read_status(self, slug: str) -> dict:
        try:
            return read_json_object(self.status_path(slug), "a LoRA's import status")
        except FetchError:  # a damaged status file: start this LoRA over
            return {}

    def write_status(self, st: dict) -> dict:
        write_json_atomic(st, self.status_path(st["slug"]), sort_keys=True)
        return st

    # --- fetch + check -------------------------------------------------------------------------
    def skeletons(self):
        if self._skeletons is None:
            from lorafind_utils.models.pipelines import base_skeletons, quiet_libraries

            quiet_libraries()
            self._skeletons = base_skeletons(self.cfg)
        return self._skeletons

    def session(self):
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def close(self):
        if self._session is not None:
            self._session.close()

    def _check(self, path: Path) -> dict:
        """``lorafind lora check``: {layout, rank, modules: {unet, text_encoder}}; raises LoraError."""
        info = inspect_lora(path)
        touched = check_lora_against_model(info, *self.skeletons())
        return {"layout": info.layout, "rank": info.rank, "modules": touched}

    def prepare(self, e: dict) -> dict:
        """Fetch and check one LoRA (skipped when an earlier run did it and its file is unchanged)."""
        slug = e["slug"]
        st = self.read_status(slug)
        dest = self.lora_dir / f"{slug}.safetensors"
        src = Path(e["source"]["file"]) if "file" in e["source"] else None
        stamp = None
        if src is not None and src.is_file():
            s = src.stat()
            stamp = [s.st_size, s.st_mtime_ns]
        same_source = st.get("source") == e["source"] and (src is None or st.get("stamp") == stamp)
        if same_source and str(st.get("status", "")).startswith("refused"):
            return st  # not a usable LoRA: permanent (delete the status file to retry)
        if same_source and st.get("status") == "ok" and _step_done(st, "checked") and dest.is_file():
            return st
        st = {"slug": slug, "name": e["name"], "source": e["source"], "file": dest.name, "step": None}
        if src is not None:
            st["stamp"] = stamp
        try:
            if src is None:
                st.update(self._fetch_civitai(e, dest))
                st["step"] = "fetched"
                try:
                    st.update(self._check(dest))
                except LoraError as err:
                    moved = quarantine(dest, dest)
                    st["status"] = f"refused: {err}{_html_hint(moved)} (moved to {moved})"
                    return self.write_status(st)
                st["step"] = "checked"
            else:
                if not src.is_file():
                    raise FetchError(f"{src}: file not found")
                try:
                    st.update(self._check(src))
                except LoraError as err:
                    st["status"] = f"refused: {err}"
                    return self.write_status(st)
                st.update(_link_in(src, dest))
                st["step"] = "checked"
        except DiskFullError as err:
            st["status"] = f"failed: fetch: {err}"
            self.write_status(st)
            raise
        except Exception as err:  # a download error, an unreadable file: this LoRA only
            what = "fetch" if st["step"] is None else "check"
            msg = str(err) if isinstance(err, FetchError) else f"{type(err).__name__}: {err}"
            st["status"] = f"failed: {what}: {redact(msg, self.token)}"
            return self.write_status(st)
        st["status"] = "ok"
        return self.write_status(st)

    def _fetch_civitai(self, e: dict, dest: Path) -> dict:
        vid = e["source"]["civitai_version_id"]
        url = f"{self.base.rstrip('/')}/{vid}"
        old = self.read_status(e["slug"])
        expected = e.get("sha256") or (old.get("sha256") if old.get("source") == e["source"] else None)
        res = download(url, dest, expected, token=self.token, progress=self.progress,
                       label=f"{e['slug']} (Civitai version {vid})", session=self.session())
        status = "present" if res.skipped else ("resumed" if res.resumed else "downloaded")
        return {"sha256": res.sha256, "bytes": res.bytes, "url": display_url(url), "download": status}


def _html_hint(path: Path) -> str:
    """A hint when a 'LoRA' is really an HTML page (a login page: a token is needed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        return ""
    if head.startswith((b"<!doctype", b"<html")):
        return f" (the server sent an HTML page, probably a login page: set {TOKEN_ENV}, a Civitai API key)"
    return ""


def _link_in(src: Path, dest: Path) -> dict:
    """Put a folder's file at ``dest`` (a hard link, else a copy), atomically; its hash and size."""
    digest = sha256_file(src)
    if dest.is_file() and sha256_file(dest) == digest:
        return {"sha256": digest, "bytes": dest.stat().st_size}
    with atomic_path(dest) as tmp:
        try:
            os.link(src.resolve(), tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(src, tmp)
    if sha256_file(dest) != digest:  # changed while copied
        dest.unlink(missing_ok=True)
        raise FetchError(f"{src}: the file changed while it was copied; run again")
    return {"sha256": digest, "bytes": dest.stat().st_size}


def _align_params(synth: Path, slugs: list[str]) -> None:
    """Let stage 01 resume in ``synth`` when the set of LoRAs changed since the last run.

    Stage 01 refuses a folder whose ``params.json`` differs from the run's, and the LoRA list is one of
    its keys. An image depends only on its own LoRA (per-image seeds and per-LoRA batches), so a changed
    list is safe: the list is replaced and the stale manifest removed; every other key must still match,
    which stage 01 then checks as usual.
    """
    pfile = layout.synth_params_file(synth)
    if not pfile.exists():
        return
    old = json.loads(pfile.read_text())
    if old.get("loras") != slugs:
        write_json_atomic(dict(old, loras=slugs), pfile, sort_keys=True)
        layout.synth_manifest(synth).unlink(missing_ok=True)


def import_catalog(cfg: dict, source: str | Path, dest: str | Path | None = None, *, params: dict | None = None,
                   restyle: bool = True, engine: str = "local", address: str | None = None, workers=None,
                   token: str | None = None, download_base: str = CIVITAI_DOWNLOAD,
                   on_restyled: Callable | None = None, pipe=None, progress: bool = True, log=print) -> dict:
    """Import the LoRAs a source names: fetch, check, restyle, (index); resumable, per-LoRA statuses.

    :param cfg: the profile (its base model for the checks and the restyling, its base-image sets).
    :param source: a folder of ``.safetensors`` files, or a YAML/JSON list of Civitai model-version ids.
    :param dest: the import's folder (default :func:`import_dir`).
    :param params: stage 01's parameters (default: the profile's ``01_synthesize``).
    :param restyle: also restyle the LoRAs that passed (else fetch and check only).
    :param engine: ``local`` or ``ray`` (see :func:`~lorafind_utils.stages.synthesis.synthesize`), with ``address``
        and ``workers``.
    :param token: Civitai API key (default ``$CIVITAI_TOKEN``); sent only to Civitai's hosts.
    :param download_base: where ``<id>`` is downloaded from (default :data:`CIVITAI_DOWNLOAD`).
    :param on_restyled: ``f(slug, status, synth_dir, manifest)``, called for each restyled LoRA not yet
        indexed (the index step); an error it raises marks that LoRA ``failed: index: ...``.
    :param pipe: an already-loaded pipeline for a local restyle (tests, notebooks).
    :return: the summary (also ``<dest>/summary.json``): counts, and every LoRA's status.
    :raises ValueError: a malformed source; :class:`~lorafind_utils.core.files.RunLocked`: another import is
        writing ``dest``; :class:`~lorafind_utils.core.download.DiskFullError`: the disk is full.
    """
    from lorafind_utils.catalog.civitai import civitai_token

    kind, entries = read_source(source)
    dest = Path(dest) if dest else import_dir(cfg, source)
    dest.mkdir(parents=True, exist_ok=True)
    with run_lock(dest, "the catalog import"):
        run = _Import(cfg, dest.resolve(), civitai_token(token), download_base, progress)
        try:
            statuses = _prepare_all(run, entries)
        finally:
            run.close()
        ok = [st for st in statuses if st.get("status") == "ok" and _step_done(st, "checked")]
        sub = _import_profile(cfg, run.dest)
        synth = layout.synth_dir(sub)
        catalog_path = Path(sub["catalog"])
        _write_catalog(catalog_path, ok, cfg)
        if restyle and ok:
            _restyle(run, cfg, sub, ok, statuses, params, engine, address, workers, pipe, progress, on_restyled)
        summary = _summary(source, kind, run.dest, statuses, catalog_path, synth)
        write_json_atomic(summary, run.dest / "summary.json", sort_keys=True)
    for slug, s in summary["loras"].items():
        log(f"{slug}: {s['status']}" + (f" ({s['step']})" if s.get("step") else ""))
    log(f"{summary['total']} LoRAs: {summary['ok']} ok ({summary['restyled']} restyled), {summary['refused']} refused, "
        f"{summary['failed']} failed; statuses in {run.dest / 'status'}")
    return summary


def _prepare_all(run: _Import, entries: list[dict]) -> list[dict]:
    from tqdm.auto import tqdm

    out = []
    for e in tqdm(entries, desc="fetch + check", unit="LoRA", disable=not run.progress):
        out.append(run.prepare(e))
    return out


def _write_catalog(path: Path, ok: list[dict], cfg: dict) -> None:
    """A catalog of the LoRAs that passed (``lora_dir``: the import's ``loras/``)."""
    entries = []
    for st in ok:
        e = {"slug": st["slug"], "short": st.get("name") or st["slug"], "file": st["file"], "sha256": st.get("sha256")}
        if "civitai_version_id" in st["source"]:
            e["civitai_version_id"] = st["source"]["civitai_version_id"]
        entries.append(e)
    text = yaml.safe_dump({"base_model": cfg.get("models", {}).get("base"), "loras": entries}, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def _import_profile(cfg: dict, dest: Path) -> dict:
    """The profile as the import's stage 01 sees it: its catalog, LoRA folder and runs folder are the import's."""
    return dict(cfg, catalog=str(dest / "catalog.yaml"), lora_dir=str(dest / "loras"), runs_dir=str(dest))


def _restyle(run: _Import, cfg: dict, sub: dict, ok: list[dict], statuses: list[dict], params, engine, address,
             workers, pipe, progress, on_restyled) -> None:
    """Stage 01 on the LoRAs that passed; LoRAs refused or failing there are marked and the rest go on."""
    from lorafind_utils.core.config import stage_params
    from lorafind_utils.core.params import check_stage_params
    from lorafind_utils.stages.synthesis import synthesize

    p = check_stage_params("01_synthesize", params if params is not None else stage_params(cfg, "01_synthesize"))
    synth, catalog_path = layout.synth_dir(sub), Path(sub["catalog"])
    by_slug = {st["slug"]: st for st in statuses}
    todo = list(ok)
    manifest = None
    while todo:
        _write_catalog(catalog_path, todo, cfg)
        _align_params(synth, [st["slug"] for st in todo])
        try:
            manifest = synthesize(sub, p, synth, pipe=pipe, progress=progress, workers=workers, engine=engine,
                                  address=address)
            break
        except (RunLocked, DiskFullError, KeyboardInterrupt):
            raise
        except Exception as err:
            marked = _mark_restyle_failure(run, err, todo, by_slug)
            todo = [st for st in todo if st["slug"] not in marked]
            if not marked:
                break
    _write_catalog(catalog_path, [st for st in statuses if st.get("status") == "ok"], cfg)
    if manifest is None:
        return
    images: dict[str, int] = {}
    for item in manifest["items"]:
        images[item["lora"]] = images.get(item["lora"], 0) + 1
    for st in todo:
        if not _step_done(st, "restyled"):
            st.update(step="restyled", images=images.get(st["slug"], 0))
            run.write_status(st)
    if on_restyled is None:
        return
    for st in todo:
        if st.get("step") != "restyled":
            continue
        try:
            on_restyled(st["slug"], dict(st), synth, manifest)
        except (KeyboardInterrupt, DiskFullError):
            raise
        except Exception as err:
            st["status"] = f"failed: index: {type(err).__name__}: {err}"
        else:
            st["step"] = "indexed"
        run.write_status(st)


def _mark_restyle_failure(run: _Import, err: Exception, todo: list[dict], by_slug: dict) -> set[str]:
    """Mark the LoRAs a stage-01 error names (refused or failed); with an error naming none, every LoRA
    not yet restyled. Returns the slugs marked."""
    from lorafind_utils.engines.ray_cluster import LorasRefused, RestyleFailed

    refused, failed = {}, {}
    if isinstance(err, (LorasRefused, RestyleFailed)):
        refused, failed = dict(err.refused), dict(getattr(err, "failed", {}))
    elif isinstance(err, LoraError):  # the local engine: "<file name>: ..." from diffusers' load
        by_file = {st["file"]: st["slug"] for st in todo}
        name = str(err).split(":", 1)[0]
        if name in by_file:
            refused[by_file[name]] = str(err)
    if not refused and not failed:
        msg = f"{type(err).__name__}: {err}"
        failed = {st["slug"]: msg for st in todo if not _step_done(st, "restyled")}
    for slug, msg in refused.items():
        st = by_slug[slug]
        st["status"] = f"refused: {msg}"
        run.write_status(st)
    for slug, msg in failed.items():
        st = by_slug[slug]
        st["status"] = f"failed: restyle: {redact(msg, run.token)}"
        run.write_status(st)
    return set(refused) | set(failed)


def _summary(source, kind: str, dest: Path, statuses: list[dict], catalog_path: Path, synth: Path) -> dict:
    def count(prefix):
        return sum(str(st.get("status", "")).startswith(prefix) for st in statuses)

    return {
        "source": str(source), "kind": kind, "dest": str(dest), "catalog": str(catalog_path), "synth_dir": str(synth),
        "total": len(statuses), "ok": count("ok"), "refused": count("refused"), "failed": count("failed"),
        "restyled": sum(st.get("status") == "ok" and _step_done(st, "restyled") for st in statuses),
        "indexed": sum(st.get("status") == "ok" and _step_done(st, "indexed") for st in statuses),
        "loras": {st["slug"]: {"status": st.get("status"), "step": st.get("step")} for st in statuses},
    }
