"""Run records: one JSON line per stage with parameters, versions, device, time, memory."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

from lorafind_utils.core.config import project_root

SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|auth|cookie|credential", re.I)
SECRET_ENV = ("CIVITAI_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
PACKAGES = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "papermill",
    "scikit-learn",
    "lorafind",
)


def git_sha() -> str | None:
    """The repository's commit (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        root = project_root()
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows): CPU numbers depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    import torch

    info = {"cpu": cpu_name(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def scrub(obj):
    """Drop secrets from anything about to be recorded: secret-looking keys and token values."""
    values = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        for v in values:
            obj = obj.replace(v, "<redacted>")
    return obj


def append_record(path: str | Path, record: dict) -> dict:
    """Append one scrubbed JSON line (with sha, versions, device, timestamp) to ``path``."""
    rec = scrub({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": git_sha(), "versions": versions(),
                 "device": device_info(), **record})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


def read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
