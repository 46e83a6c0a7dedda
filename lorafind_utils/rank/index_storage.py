"""The style index's crash-safe storage: generations swapped atomically, hashes checked on load, one
writer at a time, a torn save recovered."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafind_utils.rank.faiss_kinds import KINDS

try:  # POSIX only; elsewhere saves are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "lorafind-style-index"

VERSION = 1

INDEX_FILE = "index.faiss"

META_FILE = "index.json"

VECTORS_FILE = "vectors.npy"

VARIANTS = ("prototype", "content_cancelled")

SOURCES = ("synthesized", "thumbnails")

class IndexFileError(ValueError):
    """A saved index that cannot be used: missing, corrupt, or built by another encoder.

    :param path: the file (or folder) at fault.
    :param problem: what is wrong with it.
    :param profile: the profile to name in the rebuild hint, if known.
    """

    def __init__(self, path: str | Path, problem: str, profile: str | None = None):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; {rebuild_hint(profile)}")

def rebuild_hint(profile: str | None = None) -> str:
    """How to rebuild an index, as said in every :class:`IndexFileError`."""
    return f"run `lorafind index build --profile {profile or '<profile>'}` to rebuild it"


# --------------------------------------------------------------------------- file helpers
class Vanished(Exception):
    """The generation being read was deleted by a concurrent save (load retries)."""


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: best effort, not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def save_lock(folder: Path) -> Iterator[None]:
    """Serialise saves of ``folder`` between processes (readers do not lock)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def previous_generation(folder: Path) -> Path | None:
    """The newest complete ``.<name>.prev-*`` folder left by a save that died mid-swap."""
    cands = [p for p in folder.parent.glob(f".{folder.name}.prev-*") if (p / META_FILE).is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def recover(folder: Path) -> None:
    """Under the save lock: put back a generation a crashed save left aside, remove leftovers."""
    if not folder.exists():
        prev = previous_generation(folder)
        if prev is not None:
            os.replace(prev, folder)
    for p in list(folder.parent.glob(f".{folder.name}.saving-*")) + list(folder.parent.glob(f".{folder.name}.prev-*")):
        shutil.rmtree(p, ignore_errors=True)


def replaceable(folder: Path) -> bool:
    """Whether ``folder`` may be swapped away by a save: a style index, or an empty folder."""
    return folder.is_dir() and ((folder / META_FILE).is_file() or not any(folder.iterdir()))


@contextmanager
def open_dir(src: Path, last: bool) -> Iterator:
    """Yield ``opener(name, sha256, profile)``: a context manager giving a file of ``src`` whose bytes
    have been checked against ``sha256`` (None: no check), all read through one open handle of the folder."""
    dfd = None
    if os.open in os.supports_dir_fd:
        try:
            dfd = os.open(src, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise (Vanished() if not last else IndexFileError(src, "no index here (folder missing)")) from None

    def swapped_away() -> bool:
        """Whether the folder we opened no longer carries the name ``src`` (a save replaced it)."""
        if dfd is None:
            return not src.exists()
        try:
            st = os.stat(src)
        except FileNotFoundError:
            return True
        mine = os.fstat(dfd)
        return (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev)

    @contextmanager
    def opener(name: str, sha256: str | None, profile: str | None):
        path = src / name
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd) if dfd is not None else os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if not last and swapped_away():
                raise Vanished() from None  # the generation we opened is being deleted by a save
            raise IndexFileError(path, "file missing", profile) from None
        with os.fdopen(fd, "rb") as f:
            if sha256 is not None:
                h = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                if h.hexdigest() != sha256:
                    raise IndexFileError(path, f"content does not match the sha256 recorded in {META_FILE} "
                                               "(truncated, edited or from another save)", profile)
                f.seek(0)
            yield f

    try:
        yield opener
    finally:
        if dfd is not None:
            os.close(dfd)


def parse_meta(opener, meta_path: Path, profile: str | None) -> dict:
    """index.json, parsed and checked for the fields a load needs."""
    with opener(META_FILE, None, profile) as f:
        raw = f.read()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(meta_path, f"not valid JSON ({e})", profile) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(meta_path, f"not a style index (format is not {FORMAT!r})", profile)
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise IndexFileError(meta_path, f"version {meta.get('version')!r} is not supported (this code reads "
                                        f"up to {VERSION})", profile)
    try:
        ok = (isinstance(meta["dim"], int) and meta["dim"] > 0 and isinstance(meta["encoder"], dict)
              and meta["kind"] in KINDS + ("auto",) and meta["built_kind"] in KINDS and meta["variant"] in VARIANTS
              and isinstance(meta["next_id"], int) and isinstance(meta["entries"], list)
              and all(isinstance(meta["files"][fn]["sha256"], str) for fn in (INDEX_FILE, VECTORS_FILE))
              and all(isinstance(e["name"], str) and isinstance(e["id"], int) and isinstance(e["meta"], dict)
                      for e in meta["entries"]))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise IndexFileError(meta_path, "missing or malformed fields (dim, encoder, kind, built_kind, variant, "
                                        "next_id, entries, files)", profile)
    names = [e["name"] for e in meta["entries"]]
    ids = [e["id"] for e in meta["entries"]]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids) or any(i < 0 or i >= meta["next_id"] for i in ids):
        raise IndexFileError(meta_path, "entries have duplicate names or ids, or ids not below next_id", profile)
    return meta


def check_encoder(meta_path: Path, stored: dict, expected: dict, profile: str | None) -> None:
    """IndexFileError naming the keys where the stored encoder differs from the expected one."""
    diff = [k for k in expected if k not in stored or stored[k] != expected[k]]
    if diff:
        def show(d: dict) -> str:
            return ", ".join(f"{k}={d.get(k, '<missing>')!r}" for k in diff)

        raise IndexFileError(meta_path, f"index built with encoder {show(stored)}, this model is {show(expected)} "
                                        f"(differs in: {', '.join(diff)})", profile)
