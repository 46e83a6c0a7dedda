"""What the paper profile downloads: the 12 Civitai LoRAs, the SD1.5 + ControlNet models, ResNet50 weights
and (through :mod:`lorafind_utils.catalog.civitai`) the LoRAs' preview images. ``lorafind fetch --profile paper``
goes through :func:`fetch`; every file goes through :func:`lorafind_utils.core.download.download`.

LoRAs without a hash in the catalog get one recorded on first download in
``<lora_dir>/hashes.json`` (``{slug: sha256}``); later runs verify against it.
"""
from __future__ import annotations

import urllib.error
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import requests

from lorafind_utils.catalog.civitai import civitai_token, fetch_thumbnails
from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, resolve, stage_params
from lorafind_utils.core.download import (
    TOKEN_ENV,
    DiskFullError,
    FetchError,
    HashMismatchError,
    SilentTqdm,
    download,
    quarantine,
    raise_failures,
    read_json_object,
)
from lorafind_utils.core.files import run_lock, sha256_file, write_json_atomic

#: what ``fetch`` can download, in the order it does it.
FETCH_ITEMS = ("models", "loras", "resnet50", "thumbnails")


#: the lock file (in ``lora_dir``) of hashes recorded on first download.
HASHES_FILE = "hashes.json"


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


def _load_hashes(path: Path) -> dict[str, str]:
    """The ``{slug: sha256}`` lock file, or {} when absent."""
    return {str(k): str(v) for k, v in read_json_object(path, "a JSON object {slug: sha256}").items()}


def _check_lora(path: Path, slug: str) -> None:
    """Refuse a downloaded file that is not a safetensors LoRA: quarantine it and raise FetchError."""
    from lorafind_utils.models.loras import LoraError, inspect_lora

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
    first download. Every file must be a safetensors LoRA (:func:`~lorafind_utils.models.loras.inspect_lora`);
    one that is not is moved to ``quarantine/``. A failed entry does not stop the others: all are
    tried, then one FetchError lists the failures (a full disk stops at once).

    :param cfg: a profile (``load_profile``).
    :param token: Civitai API key; default ``$CIVITAI_TOKEN``.
    :param progress: show progress bars.
    :return: one dict per LoRA: slug, path, sha256, bytes, status (downloaded | present | resumed).
    :raises FetchError: failed entries, a catalog without URLs, a corrupt ``hashes.json``.
    """
    token = civitai_token(token)
    entries = load_catalog(cfg)
    if not any(e.get("url") for e in entries):
        raise FetchError(f"{cfg['catalog']}: no LoRA has a download url; nothing to fetch for profile "
                         f"'{cfg.get('name', '?')}' (the tiny profile builds its LoRAs itself)")
    lock_path = layout.lora_dir(cfg) / HASHES_FILE
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
    raise_failures(errors, len(entries), results, "LoRAs")
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
        with run_lock(lock_path, "recording a LoRA's hash", wait=60.0):  # read + write under one lock:
            recorded = _load_hashes(lock_path)  # a concurrent fetch's hashes stay
            recorded.setdefault(slug, res.sha256)
            write_json_atomic(recorded, lock_path, sort_keys=True)
        hashes.update(recorded)
    status = "present" if res.skipped else ("resumed" if res.resumed else "downloaded")
    return {"slug": slug, "path": str(res.path), "sha256": res.sha256, "bytes": res.bytes, "status": status}


def _hub_fetch(repo_id: str, patterns: Iterable[str], cache_dir: str | Path | None, progress: bool) -> Path:
    """``snapshot_download`` of the listed files of a Hub repo, with errors turned into FetchError."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    # huggingface_hub >= 1.x: a cached snapshot missing some requested files (older versions return it as is).
    incomplete = getattr(errors, "IncompleteSnapshotError", LocalEntryNotFoundError)

    offline = constants.HF_HUB_OFFLINE
    access = ("run `lorafind fetch --profile paper` without HF_HUB_OFFLINE on a machine with access to "
              "huggingface.co (or copy its HF_HOME cache here)")
    kwargs = {"allow_patterns": list(patterns)}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if not progress:
        kwargs["tqdm_class"] = SilentTqdm
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except (LocalEntryNotFoundError, incomplete, OfflineModeIsEnabled) as e:
        if offline:
            raise FetchError(
                f"{repo_id}: not (completely) in the Hugging Face cache and HF_HUB_OFFLINE is set; {access}"
            ) from None
        raise FetchError(
            f"{repo_id}: the Hugging Face Hub cannot be reached and the model is not cached "
            f"({type(e).__name__}); check the connection, or {access}"
        ) from None
    except GatedRepoError:
        raise FetchError(
            f"{repo_id}: a gated repository; accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"{repo_id}: repository not found on the Hugging Face Hub (or private: set HF_TOKEN)"
        ) from None
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
        where = ("ship with the repository" if cfg.get("models", {}).get("kind") == "local" else "are built locally")
        print(f"profile '{cfg.get('name', '?')}': nothing to download (its models and LoRAs {where})")
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
