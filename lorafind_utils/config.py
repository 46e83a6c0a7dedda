"""Profiles (tiny / paper) and the LoRA catalog: the one place where defaults live."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

PROFILES = ("tiny", "paper")


def project_root() -> Path:
    """The repository root (the folder holding ``configs/``), whatever the current directory is."""
    return Path(__file__).resolve().parent.parent


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """A profile path made absolute against the project root (absolute paths pass through)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def load_profile(name_or_path: str | Path = "tiny", overrides: dict | None = None) -> dict:
    """Load a profile from ``configs/<name>.yaml`` (or a YAML path) and apply overrides.

    :param name_or_path: ``tiny``, ``paper`` or a path to a YAML file of the same shape.
    :param overrides: nested dict merged over the profile (e.g. ``{"runs_dir": "/tmp/x"}``).
    :raises ValueError: unknown profile name, naming the known ones.
    """
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = project_root() / "configs" / f"{name_or_path}.yaml"
        if not p.exists():
            known = sorted(x.stem for x in (project_root() / "configs").glob("*.yaml"))
            raise ValueError(f"unknown profile '{name_or_path}'; known profiles: {', '.join(known)}")
    cfg = yaml.safe_load(p.read_text())
    if overrides:
        cfg = _merge(cfg, overrides)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_params(cfg: dict, stage: str) -> dict:
    """The papermill parameters of one stage (e.g. ``01_synthesize``) for a profile."""
    return dict(cfg.get("stages", {}).get(stage, {}))


def load_catalog(cfg: dict) -> list[dict]:
    """The profile's LoRA catalog, with each entry's file resolved under ``lora_dir``.

    :return: list of entries (slug, name, short, file, path, …) in catalog order.
    """
    path = resolve(cfg["catalog"])
    data = yaml.safe_load(path.read_text())
    entries = data["loras"] if isinstance(data, dict) else data
    slugs = [e["slug"] for e in entries]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"{path}: duplicate LoRA slugs")
    lora_dir = resolve(cfg["lora_dir"])
    out = []
    for e in entries:
        e = dict(e)
        e.setdefault("file", f"{e['slug']}.safetensors")
        e.setdefault("short", e.get("name", e["slug"]))
        e.setdefault("base_model", data.get("base_model") if isinstance(data, dict) else None)
        e["path"] = str(lora_dir / e["file"])
        out.append(e)
    return out
