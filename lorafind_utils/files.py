"""Atomic file writes: a killed run never leaves a half-written artifact behind."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
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
