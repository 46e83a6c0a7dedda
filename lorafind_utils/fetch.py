"""Downloads for the paper profile: the 12 Civitai LoRAs, the SD1.5 + ControlNet models, ResNet50 weights,
and the LoRAs' Civitai preview images (the stage-05 query "thumbnails").

``lorafind fetch --profile paper`` goes through :func:`fetch`. What a download guarantees:

* redirects are followed (Civitai answers with a redirect to its CDN); the
  ``Authorization`` header is sent to the first host only -- ``requests`` drops it
  when a redirect changes host, and the tests check that it does;
* bytes go to ``<dest>.part``; a dropped connection (or a ``.part`` left by a killed
  run) is resumed with an HTTP ``Range`` request, and started over when the server
  does not honour it;
* the SHA-256 is computed while streaming; a file whose hash differs from the
  expected one is moved to ``quarantine/`` beside its destination, never left in place;
* only a complete, verified file is renamed into place (``os.replace``), so an
  existing destination is always whole: a second run downloads nothing;
* the Civitai token travels in the ``Authorization`` header only -- never in a URL,
  a message, a log line or a file.

LoRAs without a hash in the catalog get one recorded on first download in
``<lora_dir>/hashes.json`` (``{slug: sha256}``); later runs verify against it.

Thumbnails (:func:`fetch_thumbnails`) go to ``<runs_dir>/thumbnails/<slug>/NN.<ext>`` with a
``manifest.json`` that :func:`lorafind_utils.retrieval.read_queries` reads.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import time
import urllib.error
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import urllib3
from tqdm.auto import tqdm

from .config import load_catalog, resolve, stage_params
from .files import write_json_atomic
from .records import SECRET_KEY, scrub

#: what ``fetch`` can download, in the order it does it.
FETCH_ITEMS = ("models", "loras", "resnet50", "thumbnails")
#: the environment variable holding a Civitai API key.
TOKEN_ENV = "CIVITAI_TOKEN"
#: the lock file (in ``lora_dir``) of hashes recorded on first download.
HASHES_FILE = "hashes.json"
#: Civitai's public REST API (``GET {api}/model-versions/{id}`` lists a version's preview images).
CIVITAI_API = "https://civitai.com/api/v1"
#: the folder (in ``runs_dir``) of the Civitai preview images, one sub-folder per LoRA slug.
THUMBNAILS_DIR = "thumbnails"
#: the file (in :data:`THUMBNAILS_DIR`) describing each preview image (read by ``read_queries``).
THUMBNAILS_MANIFEST = "manifest.json"
#: preview images downloaded per LoRA by default.
THUMBNAILS_PER_LORA = 6
#: URL suffixes of Civitai previews that are videos, not images (skipped).
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".m4v")
#: suffixes kept as they are for a preview image's file; anything else is saved as ``.jpg``.
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: the folder (beside a download) that files failing verification are moved to.
QUARANTINE_DIR = "quarantine"
#: Stable Diffusion 1.5 files the ControlNet img2img pipeline loads (fp32 safetensors only; no
#: safety checker, no fp16/non-EMA/.bin/.ckpt duplicates): about 4.3 GB, not the whole repository.
#: They are a superset of what diffusers asks the cache for when loading offline with
#: ``safety_checker=None``, so a later ``HF_HUB_OFFLINE=1`` load finds everything.
BASE_MODEL_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "unet/*.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/*.json",
    "vae/diffusion_pytorch_model.safetensors",
    "feature_extractor/*",
)
#: ControlNet files ``ControlNetModel.from_pretrained`` loads.
CONTROLNET_PATTERNS = ("config.json", "diffusion_pytorch_model.safetensors")
#: HTTP statuses worth retrying (rate limiting, server hiccups).
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
#: seconds before the first retry of a download (doubling after each), unless ``backoff`` is given.
RETRY_BACKOFF = 1.0
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class FetchError(ValueError):
    """A download that cannot be completed; the message says why and what to do (never the token)."""


class DiskFullError(FetchError):
    """The disk filled up while writing; the ``.part`` file is kept for a later resume."""


class HashMismatchError(FetchError):
    """A download whose SHA-256 is not the expected one; the file was moved to ``quarantine/``."""


@dataclass(frozen=True)
class DownloadResult:
    """The outcome of :func:`download`."""

    path: Path  # the verified file, in place
    sha256: str  # its SHA-256 (hex)
    bytes: int  # its size
    resumed: bool  # bytes were appended to an earlier partial download
    skipped: bool  # the file was already in place and verified; nothing was downloaded


class _ShortRead(Exception):
    """The server closed the connection before sending every byte it announced."""


class _Restart(Exception):
    """The server's answer does not continue the partial file; start over from byte 0."""


class _Retryable(Exception):
    """A transient HTTP answer (408, 429, 5xx)."""


class _SilentTqdm(tqdm):
    """tqdm with its bars disabled (``progress=False`` for huggingface_hub)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    return _hash_prefix(Path(path), chunk).hexdigest()


def _hash_prefix(path: Path, chunk: int = 1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def display_url(url: str) -> str:
    """``url`` safe to print: query parameters that look like secrets (``token=``, ``api_key=``) redacted."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [(k, "<redacted>" if SECRET_KEY.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="<>")))


def _redact(text: str, token: str | None) -> str:
    """``text`` without the token (and without any secret from the environment)."""
    if token:
        text = text.replace(token, "<redacted>")
    return scrub(text)


def quarantine(path: str | Path, dest: str | Path) -> Path:
    """Move ``path`` to ``<dest's folder>/quarantine/<dest's name>`` (replacing an older one) and return it."""
    dest = Path(dest)
    target = dest.parent / QUARANTINE_DIR / dest.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


def _total_from_content_range(value: str | None) -> int | None:
    """The full size from ``Content-Range: bytes a-b/N`` or ``bytes */N`` (None when unknown)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _start_from_content_range(value: str | None) -> int | None:
    """The first byte from ``Content-Range: bytes a-b/N`` (None when absent or malformed)."""
    if not value:
        return None
    spec = value.strip().removeprefix("bytes").strip()
    start = spec.split("-", 1)[0]
    return int(start) if start.isdigit() else None


def _blocks(r: requests.Response, chunk: int) -> Iterator[bytes]:
    """The body in blocks of at most ``chunk`` bytes, each as soon as it arrives.

    ``read1`` hands over every byte received before a connection drops (``iter_content`` fills a whole
    chunk first, losing what it had buffered when the read fails), so the ``.part`` keeps all of it.
    """
    read1 = getattr(r.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3
        yield from r.iter_content(chunk_size=chunk)
        return
    while block := read1(chunk):
        yield block


def _http_error(status: int, url: str, label: str, token: str | None) -> FetchError:
    """The FetchError for an HTTP error answer."""
    where = f"{label} ({display_url(url)})" if label else display_url(url)
    if status in (401, 403):
        if token:
            msg = (f"{where}: the server refused the token (HTTP {status}); "
                   f"set {TOKEN_ENV} (a Civitai API key) to a valid key from civitai.com > Account settings > API keys")
        else:
            msg = (f"{where}: this download needs a token (HTTP {status}); "
                   f"set {TOKEN_ENV} (a Civitai API key, from civitai.com > Account settings > API keys) and run again")
    elif status == 404:
        msg = f"{where}: not found (HTTP 404); the model version may have been removed or the URL is wrong"
    else:
        msg = f"{where}: download failed with HTTP {status}"
    return FetchError(_redact(msg, token))


def download(url: str, dest: str | Path, expected_sha256: str | None = None, token: str | None = None,
             chunk: int = 1 << 20, retries: int = 3, timeout: float = 30, progress: bool = True, *,
             label: str = "", backoff: float | None = None, session: requests.Session | None = None) -> DownloadResult:
    """Download ``url`` to ``dest``: resumable, hash-verified, atomic.

    :param url: the file's URL; redirects are followed.
    :param dest: where the verified file goes.
    :param expected_sha256: hex SHA-256 the file must have; None accepts any content.
    :param token: sent as ``Authorization: Bearer <token>`` to the URL's host only.
    :param chunk: bytes read and written at a time.
    :param retries: how many times a dropped connection, a timeout or a 408/429/5xx answer is retried
        (each retry resumes where the previous attempt stopped).
    :param timeout: seconds to wait for the connection and for each read.
    :param progress: show a progress bar.
    :param label: what is downloaded, for messages (e.g. a LoRA's slug); defaults to the URL.
    :param backoff: seconds before the first retry, doubling after each; default :data:`RETRY_BACKOFF`.
    :param session: a ``requests.Session`` to reuse; a new one by default.
    :raises FetchError: HTTP errors (401/403: a token is needed), a hash mismatch (the file is moved to
        ``quarantine/`` beside ``dest``), retries exhausted (``.part`` kept); :class:`DiskFullError` when
        the disk fills up (``.part`` kept). No message contains the token.
    """
    dest = Path(dest)
    backoff = RETRY_BACKOFF if backoff is None else backoff
    expected = expected_sha256.lower() if expected_sha256 else None
    name = label or dest.name
    if dest.exists():
        digest = sha256_file(dest, chunk)
        if expected is None or digest == expected:
            return DownloadResult(dest, digest, dest.stat().st_size, resumed=False, skipped=True)
        # A damaged or replaced file: keep it for inspection and download a fresh copy.
        moved = quarantine(dest, dest)
        print(f"{name}: {dest} has SHA-256 {digest}, expected {expected}; moved to {moved}, downloading again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        digest, size, resumed = _fetch_to_part(session, url, part, dest, token, chunk, retries, timeout, progress,
                                               label, backoff)
    finally:
        if own_session:
            session.close()
    if expected is not None and digest != expected:
        moved = quarantine(part, dest)
        raise HashMismatchError(_redact(
            f"{name}: SHA-256 mismatch for {display_url(url)}: expected {expected}, got {digest}; "
            f"the file was moved to {moved}", token))
    os.replace(part, dest)
    return DownloadResult(dest, digest, size, resumed=resumed, skipped=False)


def _token(token: str | None) -> str | None:
    """The token given, else ``$CIVITAI_TOKEN`` (None when unset or empty)."""
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


def _raise_failures(errors: list[str], n: int, results: list[dict], what: str) -> None:
    """One FetchError listing every entry that failed (and which ones are fine), if any failed."""
    if errors:
        ok = [r["slug"] for r in results]
        raise FetchError(f"{len(errors)} of {n} {what} failed" + (f" ({len(ok)} fine: {', '.join(ok)})" if ok else "")
                         + ":\n  " + "\n  ".join(errors))


#: errors after which a request is tried again
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError, http.client.HTTPException,
              _ShortRead, _Retryable)


def _wait_or_give_up(e: Exception, failures: int, retries: int, backoff: float, token: str | None, what: str,
                     kept: str = "") -> None:
    """After a transient error: wait (exponential backoff) for the next try, or raise FetchError
    once ``retries`` are used up. The message never contains the token."""
    if failures > retries:
        raise FetchError(_redact(f"{what} failed after {retries} retries ({type(e).__name__}: {e}){kept}", token)) from None
    time.sleep(backoff * 2 ** (failures - 1))


def _fetch_to_part(session: requests.Session, url: str, part: Path, dest: Path, token: str | None, chunk: int,
                   retries: int, timeout: float, progress: bool, label: str, backoff: float) -> tuple[str, int, bool]:
    """Fill ``part`` with the whole body of ``url``, resuming and retrying; return (sha256, size, resumed)."""
    name = label or dest.name
    failures = 0
    resumed = False
    carried = None  # (sha256 so far, bytes it covers): a retry continues it instead of re-reading the part

    def prefix_hash(have: int):
        return carried[0].copy() if carried and carried[1] == have else _hash_prefix(part, chunk)

    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as r:
                if r.status_code == 416 and have:
                    total = _total_from_content_range(r.headers.get("Content-Range"))
                    if total == have:  # the partial file (of an earlier attempt or run) is in fact complete
                        return prefix_hash(have).hexdigest(), have, True
                    raise _Restart()
                if r.status_code in RETRY_STATUSES:
                    raise _Retryable(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise _http_error(r.status_code, url, label, token)
                if r.status_code == 206:
                    if _start_from_content_range(r.headers.get("Content-Range")) != have:
                        raise _Restart()
                    hasher, mode, start, resumed = prefix_hash(have), "ab", have, True
                else:  # 200: the whole file (the server ignored or was not sent a Range)
                    hasher, mode, start, resumed, carried = hashlib.sha256(), "wb", 0, False, None
                length = r.headers.get("Content-Length")
                total = start + int(length) if length and length.isdigit() else None
                written = start
                with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=dest.name, disable=not progress,
                                                 leave=False) as bar:
                    for block in _blocks(r, chunk):
                        try:
                            f.write(block)
                        except OSError as e:
                            if e.errno in _DISK_FULL:
                                raise DiskFullError(
                                    f"disk full while writing {dest}: free some space and run again; "
                                    f"the {written} bytes downloaded so far are kept in {part} and will be resumed"
                                ) from None
                            raise
                        hasher.update(block)
                        written += len(block)
                        carried = (hasher, written)
                        bar.update(len(block))
                if total is not None and written < total:
                    raise _ShortRead(f"connection closed after {written} of {total} bytes")
                return hasher.hexdigest(), written, resumed
        except _Restart:
            part.unlink(missing_ok=True)
            carried = None
            failures += 1
            if failures > retries:
                raise FetchError(f"{name}: the server does not resume downloads consistently; "
                                 f"gave up after {retries} retries") from None
        except _TRANSIENT as e:
            failures += 1
            kept = f"; the {part.stat().st_size} bytes downloaded are kept in {part}, run again to resume" \
                if part.exists() and part.stat().st_size else ""
            _wait_or_give_up(e, failures, retries, backoff, token, f"{name}: download of {display_url(url)}", kept)


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON object written by an earlier run ({} when absent); ``what`` describes it in errors."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FetchError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise FetchError(f"{path}: expected {what}; fix or delete it")
    return data


def _load_hashes(path: Path) -> dict[str, str]:
    """The ``{slug: sha256}`` lock file, or {} when absent."""
    return {str(k): str(v) for k, v in _read_json_object(path, "a JSON object {slug: sha256}").items()}


def _check_lora(path: Path, slug: str) -> None:
    """Refuse a downloaded file that is not a safetensors LoRA: quarantine it and raise FetchError."""
    from .loras import LoraError, inspect_lora

    try:
        inspect_lora(path)
    except LoraError as e:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
        hint = (f" (the server sent an HTML page, probably a login page: set {TOKEN_ENV}, a Civitai API key)"
                if head.startswith((b"<!doctype", b"<html")) else "")
        moved = quarantine(path, path)
        raise FetchError(f"{slug}: the downloaded file is not a usable safetensors LoRA: {e}{hint}; "
                         f"moved to {moved}") from None


def fetch_loras(cfg: dict, token: str | None = None, progress: bool = True) -> list[dict]:
    """Download every LoRA of the profile's catalog into ``lora_dir`` and verify it.

    Each entry's ``url`` is downloaded to its ``path`` and checked against the catalog's ``sha256``,
    or -- when the catalog has none -- against the hash recorded in ``<lora_dir>/hashes.json`` on its
    first download. Every file must be a safetensors LoRA (:func:`~lorafind_utils.loras.inspect_lora`);
    one that is not is moved to ``quarantine/``. A failed entry does not stop the others: all are
    tried, then one FetchError lists the failures (a full disk stops at once).

    :param cfg: a profile (``load_profile``).
    :param token: Civitai API key; default ``$CIVITAI_TOKEN``.
    :param progress: show progress bars.
    :return: one dict per LoRA: slug, path, sha256, bytes, status (downloaded | present | resumed).
    :raises FetchError: failed entries, a catalog without URLs, a corrupt ``hashes.json``.
    """
    token = _token(token)
    entries = load_catalog(cfg)
    if not any(e.get("url") for e in entries):
        raise FetchError(f"{cfg['catalog']}: no LoRA has a download url; nothing to fetch for profile "
                         f"'{cfg.get('name', '?')}' (the tiny profile builds its LoRAs itself)")
    lock_path = resolve(cfg["lora_dir"]) / HASHES_FILE
    hashes = _load_hashes(lock_path)
    results, errors = [], []
    with requests.Session() as session:
        for e in entries:
            slug, path = e["slug"], Path(e["path"])
            try:
                results.append(_fetch_one_lora(e, slug, path, hashes, lock_path, token, progress, session))
            except DiskFullError:
                raise
            except FetchError as err:
                errors.append(str(err))
    _raise_failures(errors, len(entries), results, "LoRAs")
    return results


def _fetch_one_lora(e: dict, slug: str, path: Path, hashes: dict[str, str], lock_path: Path, token: str | None,
                    progress: bool, session: requests.Session) -> dict:
    """Download, verify and record one catalog entry (see :func:`fetch_loras`)."""
    if not e.get("url"):
        if not path.exists():
            raise FetchError(f"{slug}: no url in the catalog and {path} does not exist; put the file there")
        _check_lora(path, slug)
        return {"slug": slug, "path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "status": "present"}
    expected = e.get("sha256") or hashes.get(slug)
    label = f"{slug} (Civitai version {e['civitai_version_id']})" if e.get("civitai_version_id") else slug
    try:
        res = download(e["url"], path, expected, token=token, progress=progress, label=label, session=session)
    except HashMismatchError as err:
        if not e.get("sha256") and slug in hashes:
            raise FetchError(f"{err}. The hash was recorded in {lock_path} on the first download: the file "
                             f"changed upstream or was corrupted; if the new version is intended, delete the "
                             f"'{slug}' entry there and run again") from None
        raise
    _check_lora(res.path, slug)
    if not e.get("sha256") and slug not in hashes:
        hashes[slug] = res.sha256
        write_json_atomic(hashes, lock_path, sort_keys=True)
    status = "present" if res.skipped else ("resumed" if res.resumed else "downloaded")
    return {"slug": slug, "path": str(res.path), "sha256": res.sha256, "bytes": res.bytes, "status": status}


def _hub_fetch(repo_id: str, patterns: Iterable[str], cache_dir: str | Path | None, progress: bool) -> Path:
    """``snapshot_download`` of the listed files of a Hub repo, with errors turned into FetchError."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    # huggingface_hub >= 1.x: a cached snapshot missing some requested files (older versions return it as is).
    incomplete = getattr(errors, "IncompleteSnapshotError", LocalEntryNotFoundError)

    offline = constants.HF_HUB_OFFLINE
    access = ("run `lorafind fetch --profile paper` without HF_HUB_OFFLINE on a machine with access to "
              "huggingface.co (or copy its HF_HOME cache here)")
    kwargs = {"allow_patterns": list(patterns)}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if not progress:
        kwargs["tqdm_class"] = _SilentTqdm
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except (LocalEntryNotFoundError, incomplete, OfflineModeIsEnabled) as e:
        if offline:
            raise FetchError(f"{repo_id}: not (completely) in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"{access}") from None
        raise FetchError(f"{repo_id}: the Hugging Face Hub cannot be reached and the model is not cached "
                         f"({type(e).__name__}); check the connection, or {access}") from None
    except GatedRepoError:
        raise FetchError(f"{repo_id}: a gated repository; accept its terms on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise FetchError(f"{repo_id}: repository not found on the Hugging Face Hub (or private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise FetchError(f"{repo_id}: Hugging Face Hub download failed (HTTP {status})") from None


def fetch_models(cfg: dict, progress: bool = True, cache_dir: str | Path | None = None) -> list[dict]:
    """Download the profile's base model and ControlNet into the Hugging Face cache (``HF_HOME``).

    Only the files the pipeline loads are fetched (:data:`BASE_MODEL_PATTERNS`,
    :data:`CONTROLNET_PATTERNS`). ``HF_HUB_OFFLINE=1`` is honoured: then only the cache is used.
    Profiles whose models are not Hub ids (``models.kind`` other than ``hub``) need nothing.

    :param cfg: a profile (``load_profile``).
    :param progress: show progress bars.
    :param cache_dir: Hugging Face cache folder; default the ``HF_HOME``/``HF_HUB_CACHE`` one.
    :return: one dict per model: role, repo_id, path (the snapshot folder), status.
    :raises FetchError: offline with nothing cached, unreachable Hub, missing or gated repository.
    """
    models = cfg["models"]
    if models.get("kind") != "hub":
        return [{"role": role, "repo_id": None, "path": str(resolve(models[role])), "status": "local"}
                for role in ("base", "controlnet")]
    out = []
    for role, patterns in (("base", BASE_MODEL_PATTERNS), ("controlnet", CONTROLNET_PATTERNS)):
        repo_id = models[role]
        path = _hub_fetch(repo_id, patterns, cache_dir, progress)
        out.append({"role": role, "repo_id": repo_id, "path": str(path), "status": "cached"})
    return out


def fetch_resnet50_weights(progress: bool = True) -> dict:
    """Download torchvision's ResNet50 ``IMAGENET1K_V2`` weights into the torch hub cache (``TORCH_HOME``).

    The file's name carries a hash prefix, which is checked. Nothing is downloaded when it is cached.

    :return: path, status (present | downloaded).
    :raises FetchError: the weights cannot be downloaded (no connection, a bad file).
    """
    import torch
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V2
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
    present = path.exists()
    try:
        weights.get_state_dict(progress=progress, check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"ResNet50 ImageNet weights: download of {weights.url} to {path.parent} failed "
                         f"({type(e).__name__}: {e}); run on a machine with internet access, or copy the "
                         f"file there") from None
    except RuntimeError as e:  # torch.hub's hash check
        raise FetchError(f"ResNet50 ImageNet weights: {path} is corrupt ({e}); delete it and run again") from None
    return {"path": str(path), "status": "present" if present else "downloaded"}


def needed_items(cfg: dict) -> list[str]:
    """What a profile needs downloaded: ``models`` for Hub ids, ``loras`` when its catalog has URLs,
    ``resnet50`` when stage 02's backbone is ResNet50, ``thumbnails`` (the stage-05 queries) when the
    models are Hub ids, the catalog has Civitai version ids and stage 05 neither makes its queries nor
    reads them from a ``queries_dir`` of its own (the tiny profile needs nothing)."""
    items = []
    hub = cfg["models"].get("kind") == "hub"
    if hub:
        items.append("models")
    catalog = load_catalog(cfg)
    if any(e.get("url") for e in catalog):
        items.append("loras")
    if stage_params(cfg, "02_finetune").get("backbone", "resnet50") == "resnet50":
        items.append("resnet50")
    retrieve = stage_params(cfg, "05_retrieve_thumbnails")
    if (hub and any(e.get("civitai_version_id") for e in catalog) and not retrieve.get("make_queries")
            and not retrieve.get("queries_dir")):
        items.append("thumbnails")
    return items


def fetch(cfg: dict, what: Iterable[str] | None = None, progress: bool = True) -> dict[str, list[dict]]:
    """Fetch what the profile needs, printing one summary line per file or model.

    :param cfg: a profile (``load_profile``).
    :param what: any of ``models``, ``loras``, ``resnet50``, ``thumbnails`` (done in that order);
        default :func:`needed_items` (for the paper profile: all four).
    :param progress: show progress bars.
    :return: {item: list of result dicts} for the items done.
    :raises FetchError: an unknown item, or the first item that fails (earlier ones stay done).
    """
    what = needed_items(cfg) if what is None else list(what)
    unknown = [w for w in what if w not in FETCH_ITEMS]
    if unknown:
        raise FetchError(f"unknown fetch item(s) {', '.join(unknown)}; choose from {', '.join(FETCH_ITEMS)}")
    if not what:
        print(f"profile '{cfg.get('name', '?')}': nothing to download (its models and LoRAs are built locally)")
    done: dict[str, list[dict]] = {}
    for item in FETCH_ITEMS:
        if item not in what:
            continue
        if item == "models":
            done[item] = fetch_models(cfg, progress=progress)
            for m in done[item]:
                print(f"model {m['role']}: {m['repo_id'] or m['path']} {m['status']}"
                      + (f" ({m['path']})" if m["repo_id"] else ""))
        elif item == "loras":
            done[item] = fetch_loras(cfg, progress=progress)
            for r in done[item]:
                print(f"lora {r['slug']}: {r['status']} {r['path']} ({r['bytes'] / 2**20:.1f} MiB, "
                      f"sha256 {r['sha256'][:12]})")
        elif item == "resnet50":
            done[item] = [fetch_resnet50_weights(progress=progress)]
            print(f"resnet50 ImageNet weights: {done[item][0]['status']} {done[item][0]['path']}")
        else:
            done[item] = fetch_thumbnails(cfg, progress=progress)
            for t in done[item]:
                print(f"thumbnails {t['slug']}: {t['status']} ({len(t['files'])} of {t['images']} preview "
                      f"images of Civitai version {t['civitai_version_id']})")
    return done


def _get_json(session: requests.Session, url: str, label: str, token: str | None, timeout: float = 30,
              retries: int = 3, backoff: float | None = None):
    """``GET url`` as JSON (token in the ``Authorization`` header only), retrying transient failures.

    :raises FetchError: HTTP errors (404: the model version does not exist), an answer that is not JSON,
        retries exhausted. No message contains the token.
    """
    backoff = RETRY_BACKOFF if backoff is None else backoff
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    failures = 0
    while True:
        try:
            r = session.get(url, headers=headers, timeout=timeout, allow_redirects=True)
            if r.status_code in RETRY_STATUSES:
                raise _Retryable(f"HTTP {r.status_code}")
        except _TRANSIENT as e:
            failures += 1
            _wait_or_give_up(e, failures, retries, backoff, token, f"{label}: request to {display_url(url)}")
            continue
        if r.status_code >= 400:
            raise _http_error(r.status_code, url, label, token)
        try:
            return json.loads(r.content)
        except ValueError as e:
            raise FetchError(_redact(f"{label}: {display_url(url)} did not answer with valid JSON "
                                     f"({type(e).__name__}: {e})", token)) from None


def _is_video(item: dict) -> bool:
    """A Civitai preview that is a video (``type: video`` or a video file suffix)."""
    path = urlsplit(str(item.get("url", ""))).path.lower()
    return str(item.get("type", "image")).lower() == "video" or path.endswith(VIDEO_SUFFIXES)


def _image_ext(url: str) -> str:
    """The file suffix of a preview image, from its URL's path (``.jpg`` when it has none or an odd one)."""
    ext = Path(urlsplit(url).path).suffix.lower()
    return ext if ext in _IMAGE_EXTS else ".jpg"


def _load_thumbnail_manifest(path: Path) -> dict:
    """An earlier run's thumbnail manifest ({} when absent)."""
    data = _read_json_object(path, "a JSON object with a 'queries' list")
    if not isinstance(data.get("queries", []), list):
        raise FetchError(f"{path}: expected a JSON object with a 'queries' list; fix or delete it")
    return data


def fetch_thumbnails(cfg: dict, per_lora: int = THUMBNAILS_PER_LORA, token: str | None = None,
                     progress: bool = True, api_base: str = CIVITAI_API) -> list[dict]:
    """Download the Civitai preview images of every catalog LoRA: the paper's stage-05 queries.

    For each catalog entry with a ``civitai_version_id``, ``GET {api_base}/model-versions/{id}`` lists
    the version's previews; videos are skipped and the first ``per_lora`` images are downloaded (with
    :func:`download`) to ``<runs_dir>/thumbnails/<slug>/<NN>.<ext>``. ``<runs_dir>/thumbnails/manifest.json``
    records each file (``{"queries": [{"file", "lora", "how", "url"}, ...]}``, what
    :func:`~lorafind_utils.retrieval.read_queries` reads) and, under ``versions``, how many images each
    version had, so a later run with everything in place makes no request at all. A failed LoRA does not
    stop the others: all are tried, the manifest is written, then one FetchError lists the failures.

    :param cfg: a profile (``load_profile``).
    :param per_lora: preview images per LoRA (at most; a version may have fewer).
    :param token: Civitai API key, sent in the ``Authorization`` header only (and to image URLs only
        when they are on the API's host); default ``$CIVITAI_TOKEN``.
    :param progress: show progress bars.
    :param api_base: Civitai's API root.
    :return: one dict per LoRA: slug, civitai_version_id, status (downloaded | present | no images),
        files (paths), images (how many images the version has).
    :raises FetchError: an unknown model version (HTTP 404), an answer that is not JSON, other HTTP
        errors, a catalog without Civitai version ids. No message contains the token.
    """
    if per_lora < 1:
        raise FetchError(f"per_lora must be at least 1, not {per_lora}")
    token = _token(token)
    entries = [e for e in load_catalog(cfg) if e.get("civitai_version_id")]
    if not entries:
        raise FetchError(f"{cfg['catalog']}: no LoRA has a civitai_version_id; no Civitai preview images to fetch "
                         f"for profile '{cfg.get('name', '?')}'")
    folder = resolve(cfg["runs_dir"]) / THUMBNAILS_DIR
    manifest_path = folder / THUMBNAILS_MANIFEST
    old = _load_thumbnail_manifest(manifest_path)
    old_versions = old.get("versions", {}) if isinstance(old.get("versions"), dict) else {}
    queries, versions, results, errors = [], {}, [], []
    with requests.Session() as session:
        for e in entries:
            slug = e["slug"]
            prev_q = [q for q in old.get("queries", []) if isinstance(q, dict) and q.get("lora") == slug]
            try:
                res, qs = _fetch_lora_thumbnails(e, folder, per_lora, token, progress, api_base, session,
                                                 old_versions.get(slug), prev_q)
            except DiskFullError:
                raise
            except FetchError as err:
                errors.append(str(err))
                queries.extend(prev_q)  # keep what an earlier run recorded
                if slug in old_versions:
                    versions[slug] = old_versions[slug]
                continue
            results.append(res)
            queries.extend(qs)
            versions[slug] = {"civitai_version_id": e["civitai_version_id"], "images": res["images"]}
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"queries": queries, "versions": versions}
    if manifest != old:
        write_json_atomic(manifest, manifest_path)
    _raise_failures(errors, len(entries), results, "LoRAs' preview images")
    return results


def _fetch_lora_thumbnails(e: dict, folder: Path, per_lora: int, token: str | None, progress: bool, api_base: str,
                           session: requests.Session, prev: dict | None, prev_q: list[dict]) -> tuple[dict, list[dict]]:
    """The preview images of one catalog entry (see :func:`fetch_thumbnails`): (result, manifest queries)."""
    slug, vid = e["slug"], e["civitai_version_id"]
    label = f"{slug} (Civitai version {vid})"
    how = f"Civitai preview image of model version {vid}"
    # Everything an earlier run recorded for this version is in place: no request at all.
    if prev and str(prev.get("civitai_version_id")) == str(vid) and isinstance(prev.get("images"), int):
        n = min(per_lora, prev["images"])
        have = prev_q[:n]
        if len(have) == n and all((folder / str(q.get("file", ""))).is_file() for q in have):
            status = "present" if n else "no images"
            return ({"slug": slug, "civitai_version_id": vid, "status": status,
                     "files": [str(folder / q["file"]) for q in have], "images": prev["images"]}, have)
    url = f"{api_base.rstrip('/')}/model-versions/{vid}"
    data = _get_json(session, url, label, token)
    if not isinstance(data, dict):
        raise FetchError(f"{label}: {display_url(url)} answered {type(data).__name__}, not a JSON object")
    items = data.get("images") or []
    if not isinstance(items, list):
        raise FetchError(f"{label}: {display_url(url)} answered an 'images' that is not a list")
    images = [i for i in items if isinstance(i, dict) and i.get("url") and not _is_video(i)]
    api_host = urlsplit(api_base).netloc
    files, queries, downloaded = [], [], False
    for index, item in enumerate(images[:per_lora]):
        img_url = str(item["url"])
        name = f"{index:02d}{_image_ext(img_url)}"
        send = token if urlsplit(img_url).netloc == api_host else None
        res = download(img_url, folder / slug / name, token=send, progress=progress,
                       label=f"{label} preview image {index}", session=session)
        downloaded = downloaded or not res.skipped
        files.append(str(res.path))
        queries.append({"file": f"{slug}/{name}", "lora": slug, "how": how,
                        "url": _redact(display_url(img_url), token)})
    status = "no images" if not images else ("downloaded" if downloaded else "present")
    return {"slug": slug, "civitai_version_id": vid, "status": status, "files": files, "images": len(images)}, queries
