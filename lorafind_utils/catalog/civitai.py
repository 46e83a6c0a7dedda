"""Civitai: the API token, and the LoRAs' preview images (the paper's stage-05 query "thumbnails").

Thumbnails (:func:`fetch_thumbnails`) go to ``<runs_dir>/thumbnails/<slug>/NN.<ext>`` with a
``manifest.json`` that :func:`lorafind_utils.stages.retrieval.read_queries` reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import requests

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog
from lorafind_utils.core.download import (
    TOKEN_ENV,
    DiskFullError,
    FetchError,
    display_url,
    download,
    get_json,
    raise_failures,
    read_json_object,
    redact,
)
from lorafind_utils.core.files import write_json_atomic

#: Civitai's public REST API (``GET {api}/model-versions/{id}`` lists a version's preview images).
CIVITAI_API = "https://civitai.com/api/v1"






#: preview images downloaded per LoRA by default.
THUMBNAILS_PER_LORA = 6


#: URL suffixes of Civitai previews that are videos, not images (skipped).
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".m4v")


#: suffixes kept as they are for a preview image's file; anything else is saved as ``.jpg``.
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def civitai_token(token: str | None) -> str | None:
    """The token given, else ``$CIVITAI_TOKEN`` (None when unset or empty)."""
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


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
    data = read_json_object(path, "a JSON object with a 'queries' list")
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
    :func:`~lorafind_utils.stages.retrieval.read_queries` reads) and, under ``versions``, how many images each
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
    token = civitai_token(token)
    entries = [e for e in load_catalog(cfg) if e.get("civitai_version_id")]
    if not entries:
        raise FetchError(f"{cfg['catalog']}: no LoRA has a civitai_version_id; no Civitai preview images to fetch "
                         f"for profile '{cfg.get('name', '?')}'")
    folder = layout.thumbnails_dir(cfg)
    manifest_path = layout.queries_manifest(folder)
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
    raise_failures(errors, len(entries), results, "LoRAs' preview images")
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
    data = get_json(session, url, label, token)
    if not isinstance(data, dict):
        raise FetchError(f"{label}: {display_url(url)} answered {type(data).__name__}, not a JSON object")
    items = data.get("images") or []
    if not isinstance(items, list):
        raise FetchError(f"{label}: {display_url(url)} answered an 'images' that is not a list")
    images = [i for i in items if isinstance(i, dict) and i.get("url") and not _is_video(i)]
    files, queries, downloaded = [], [], False
    for index, item in enumerate(images[:per_lora]):
        img_url = str(item["url"])
        name = f"{index:02d}{_image_ext(img_url)}"
        res = download(img_url, folder / slug / name, token=token, progress=progress,
                       label=f"{label} preview image {index}", session=session)
        downloaded = downloaded or not res.skipped
        files.append(str(res.path))
        queries.append({"file": f"{slug}/{name}", "lora": slug, "how": how,
                        "url": redact(display_url(img_url), token)})
    status = "no images" if not images else ("downloaded" if downloaded else "present")
    return {"slug": slug, "civitai_version_id": vid, "status": status, "files": files, "images": len(images)}, queries
