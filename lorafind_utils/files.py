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
