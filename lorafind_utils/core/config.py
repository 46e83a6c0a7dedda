"""Profiles (tiny / paper) and the LoRA catalog: the one place where defaults live."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

PROFILES = ("tiny", "paper", "standin")


def project_root() -> Path:
    """The repository root (the folder holding ``configs/``), whatever the current directory is."""
    return Path(__file__).resolve().parents[2]


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """A profile path made absolute against the project root (absolute paths pass through)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def load_profile(name_or_path: str | Path = "tiny", overrides: dict | None = None) -> dict:
    """Load a profile from ``configs/<name>.yaml`` (or a YAML path) and apply overrides.

    :param name_or_path: ``tiny``, ``paper`` or a path to a YAML file of the same shape.
    :param overrides: nested dict merged over the profile (e.g. ``{"runs_dir": "/tmp/x"}``).
    :raises ValueError: unknown profile name, naming the known ones; ``ParamError`` (a ValueError):
        an unknown, missing or bad key, naming the key, the file and the allowed values.
    """
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = project_root() / "configs" / f"{name_or_path}.yaml"
        if not p.exists():
            known = sorted(x.stem for x in (project_root() / "configs").glob("*.yaml"))
            raise ValueError(f"unknown profile '{name_or_path}'; known profiles: {', '.join(known)}")
    from lorafind_utils.core.params import check_profile

    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from None
    if overrides and isinstance(cfg, dict):
        cfg = merge(cfg, overrides)
    return check_profile(cfg, str(p) + (" (with overrides)" if overrides else ""))


def merge(a: dict, b: dict) -> dict:
    """``b`` over a deep copy of ``a``, nested dicts merged key by key (profile overrides)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_params(cfg: dict, stage: str) -> dict:
    """The parameters of one stage (e.g. ``01_synthesize``) for a profile (checked when loaded)."""
    return copy.deepcopy(cfg["stages"][stage])


#: a catalog slug: also a folder and file name, so no separators, no leading dot
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CatalogError(ValueError):
    """A catalog entry that is malformed or would read or write outside ``lora_dir`` (names the entry)."""


def load_catalog(cfg: dict) -> list[dict]:
    """The profile's LoRA catalog, with each entry's file resolved under ``lora_dir``.

    Catalogs are shared files, so every entry is checked here, before anything writes: a slug is
    a plain name (letters, digits, ``.``, ``_``, ``-``; it names folders and files), and a file is
    a plain name or a relative path that stays inside ``lora_dir`` (symlinks resolved) -- never an
    absolute path or ``..``.

    :return: list of entries (slug, name, short, file, path, …) in catalog order.
    :raises CatalogError: naming the catalog file, the entry and what is wrong.
    """
    path = resolve(cfg["catalog"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CatalogError(f"{path}: not valid YAML ({e})") from None
    entries = data.get("loras") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CatalogError(f"{path}: expected a list of LoRA entries (under 'loras:'), each a mapping with a slug")
    lora_dir = resolve(cfg["lora_dir"])
    root = lora_dir.resolve()
    out, seen = [], set()
    for i, e in enumerate(entries):
        e = dict(e)
        where = f"{path}: entry {i + 1}"
        slug = e.get("slug")
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):
            raise CatalogError(f"{where}: slug {slug!r} is not a plain name (letters, digits, '.', '_', '-'; "
                               "it names folders and files, so no '/', '\\' or leading '.')")
        if slug in seen:
            raise CatalogError(f"{path}: duplicate LoRA slug '{slug}'")
        seen.add(slug)
        e.setdefault("file", f"{slug}.safetensors")
        file = e["file"]
        if (
            not isinstance(file, str)
            or not file
            or Path(file).is_absolute()
            or "\\" in file
            or ".." in Path(file).parts
        ):
            raise CatalogError(f"{where} ({slug}): file {file!r} must be a file name inside lora_dir ({lora_dir}), "
                               "not an absolute path or one with '..'")
        p = lora_dir / file
        if not (p.resolve() == root / Path(file) or root in p.resolve().parents):
            raise CatalogError(
                f"{where} ({slug}): file {file!r} resolves to {p.resolve()}, outside lora_dir ({lora_dir})"
            )
        e.setdefault("short", e.get("name", slug))
        e.setdefault("base_model", data.get("base_model") if isinstance(data, dict) else None)
        e["path"] = str(p)
        out.append(e)
    return out
