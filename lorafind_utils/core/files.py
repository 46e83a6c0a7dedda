"""Atomic file writes and run-folder locks: a killed run never leaves a half-written artifact
behind, and two writers never mix their files in one folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary name is unique per call (process id + random), so two processes writing the
    same file never share one: each rename is atomic and a reader sees the old file or a whole
    new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj, path: str | Path, **dumps) -> None:
    """``json.dumps(obj, indent=2, **dumps)`` written atomically to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, **dumps))


def write_csv_atomic(df, path: str | Path) -> Path:
    """A pandas DataFrame as CSV (no index), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def write_markdown_table(path: str | Path, head: list[str], rows: list[list[str]], notes: str = "") -> Path:
    """A GitHub-flavoured markdown table (cells already formatted), optionally followed by a paragraph."""
    path = Path(path)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


class RunLocked(RuntimeError):
    """Another process is writing this run folder; the message names it."""


@contextmanager
def run_lock(folder: str | Path, what: str = "this run", wait: float = 0.0):
    """Hold an exclusive lock on a run folder (or a file) while writing it (``fcntl.flock`` on
    ``.<name>.run.lock`` beside it, so that it survives the folder being swapped, see :func:`staged_dir`).

    A second writer (another ``lorafind`` command, a notebook) waits up to ``wait`` seconds for its
    turn (default: not at all), then is refused with a message naming the holder (pid, host,
    command, start time), instead of mixing its files with the first one's. The lock goes with the
    process: a killed holder leaves no stale lock.

    A read-modify-write of a shared file must *read* under this lock too, else a second writer
    saves its stale copy over the first one's change.

    :raises RunLocked: the folder is being written by another process (still, after ``wait`` seconds).
    """
    import fcntl

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.run.lock")
    f = open(lock, "a+")
    try:
        deadline = time.monotonic() + max(0.0, float(wait))
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                f.seek(0)
                holder = f.read().strip() or "another process"
                waited = f" (waited {wait:g} s)" if wait else ""
                raise RunLocked(f"{folder} is being written by {holder}{waited}; wait for it to finish "
                                f"(or stop it) before running {what} again") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])[:120]}), "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield lock
    finally:
        f.close()  # releases the lock


@contextmanager
def staged_dir(final: str | Path):
    """Write a whole folder elsewhere, then swap it into place: a reader sees the old folder or
    the new one, never a mix (a killed run leaves the old one untouched).

    Yields the staging folder (a sibling of ``final``); on success the old folder (if any) is
    moved aside, the new one renamed into place, and the old one deleted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    stage = final.with_name(f".{final.name}.partial-{token}")
    stage.mkdir()
    try:
        yield stage
        old = final.with_name(f".{final.name}.old-{token}")
        if final.exists():
            os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def tree_bytes(folder: str | Path, exclude: tuple[Path, ...] = ()) -> int:
    """Bytes of every regular file under ``folder`` (not following links), minus ``exclude`` folders."""
    total = 0
    ex = {str(Path(p)) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if str(Path(dirpath) / d) not in ex]
        for f in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:  # removed while walking
                continue
            if stat.S_ISREG(st.st_mode):  # not a link, socket or fifo
                total += st.st_size
    return total


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks: the project's one hash of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
