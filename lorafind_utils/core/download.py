"""A resumable, hash-checked HTTP downloader (used for LoRAs, models and preview images).

What a download guarantees:

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
* a token travels in the ``Authorization`` header only, and only to Civitai's hosts
  (:data:`TOKEN_HOSTS`) -- never to a host a catalog names, never in a URL, a message, a log line or a file.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import urllib3
from tqdm.auto import tqdm

from lorafind_utils.core.files import sha256_file
from lorafind_utils.core.records import SECRET_KEY, scrub

#: the environment variable that holds the download token (a Civitai API key); messages name it
TOKEN_ENV = "CIVITAI_TOKEN"
#: the only hosts a token is ever sent to (and their subdomains): Civitai's. A catalog may name any
#: URL; a request to another host, first or after a redirect, goes without the token.
TOKEN_HOSTS = ("civitai.com",)


def token_for(url: str, token: str | None, hosts: tuple[str, ...] | None = None) -> str | None:
    """``token`` if ``url`` is on an allowed host (:data:`TOKEN_HOSTS`, over https), else None."""
    if not token:
        return None
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = TOKEN_HOSTS if hosts is None else hosts
    # loopback hosts are allowed over http (tests and local mirrors); everything else needs https
    secure = parts.scheme == "https" or host in ("127.0.0.1", "localhost", "::1")
    ok = any(host == h or host.endswith("." + h) for h in allowed)
    return token if ok and secure else None

#: the folder (beside a download) that files failing verification are moved to.
QUARANTINE_DIR = "quarantine"


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


class SilentTqdm(tqdm):
    """tqdm with its bars disabled (``progress=False`` for huggingface_hub)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


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
    query = [
        (k, "<redacted>" if SECRET_KEY.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="<>")))


def redact(text: str, token: str | None) -> str:
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
    return FetchError(redact(msg, token))


def download(url: str, dest: str | Path, expected_sha256: str | None = None, token: str | None = None,
             chunk: int = 1 << 20, retries: int = 3, timeout: float = 30, progress: bool = True, *,
             label: str = "", backoff: float | None = None, session: requests.Session | None = None) -> DownloadResult:
    """Download ``url`` to ``dest``: resumable, hash-verified, atomic.

    :param url: the file's URL; redirects are followed.
    :param dest: where the verified file goes.
    :param expected_sha256: hex SHA-256 the file must have; None accepts any content.
    :param token: sent as ``Authorization: Bearer <token>`` only when the URL's host is one of
        :data:`TOKEN_HOSTS` (Civitai), and never past a redirect to another host.
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
        raise HashMismatchError(redact(
            f"{name}: SHA-256 mismatch for {display_url(url)}: expected {expected}, got {digest}; "
            f"the file was moved to {moved}", token))
    os.replace(part, dest)
    return DownloadResult(dest, digest, size, resumed=resumed, skipped=False)


def raise_failures(errors: list[str], n: int, results: list[dict], what: str) -> None:
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
        raise FetchError(
            redact(f"{what} failed after {retries} retries ({type(e).__name__}: {e}){kept}", token)
        ) from None
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
        auth = token_for(url, token)  # Civitai's hosts only; requests drops it if a redirect changes host
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
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


def read_json_object(path: Path, what: str) -> dict:
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


def get_json(session: requests.Session, url: str, label: str, token: str | None, timeout: float = 30,
              retries: int = 3, backoff: float | None = None):
    """``GET url`` as JSON (token in the ``Authorization`` header only), retrying transient failures.

    :raises FetchError: HTTP errors (404: the model version does not exist), an answer that is not JSON,
        retries exhausted. No message contains the token.
    """
    backoff = RETRY_BACKOFF if backoff is None else backoff
    headers = {"Accept": "application/json"}
    auth = token_for(url, token)
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
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
            raise FetchError(redact(f"{label}: {display_url(url)} did not answer with valid JSON "
                                     f"({type(e).__name__}: {e})", token)) from None
