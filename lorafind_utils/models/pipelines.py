"""The model layer every stage imports: device, dtypes, scheduler, where models load from,
the SD1.5 + ControlNet pipeline (and its weight-free skeletons), the LoRA files in place.

Both profiles load through ``from_pretrained`` from a hub id or a local folder; the ``tiny``
profile builds its seeded stand-ins on first use (:mod:`lorafind_utils.models.standins`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lorafind_utils.core.config import load_catalog, resolve
from lorafind_utils.core.layout import lora_dir

#: every pipeline's scheduler (diffusers class name): UniPC, as diffusers recommends for ControlNet
SCHEDULER = "UniPCMultistepScheduler"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_libraries() -> None:
    """Silence per-call progress bars and info logs of diffusers/transformers (we show our own)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def check_denoising_steps(steps: int, strength: float, where: str = "") -> int:
    """The img2img denoising steps diffusers runs, ``int(steps * strength)``; at least 1, or a
    ValueError naming both values (diffusers would fail deep inside with a tensor-size error).

    Found by the paper profile's dry run (``steps: 1`` at the paper's ``strength: 0.8``)."""
    n = int(int(steps) * float(strength))
    if n < 1:
        raise ValueError(f"{where + ': ' if where else ''}steps {steps} x strength {strength} leaves no denoising step "
                         f"(img2img runs int(steps x strength) = {n}); use steps >= {math.ceil(1 / float(strength))}")
    return n


def pick_device(pref: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def profile_device(cfg: dict) -> str:
    """The profile's device as a string (``cpu``, ``cuda``)."""
    return str(pick_device(cfg["device"]))


def prepare_models(cfg: dict) -> tuple[str, str]:
    """Where the base pipeline and ControlNet load from: ``standin`` builds the seeded stand-ins on first use,
    ``local`` loads folders shipped in the repository (the trained tiny world), ``hub`` a hub id or its cache."""
    m = cfg["models"]
    if m["kind"] == "standin":
        from lorafind_utils.models.standins import ensure_tiny_models

        b, c = ensure_tiny_models(resolve(m["base"]), resolve(m["controlnet"]), seed=int(m.get("seed", 0)))
        return str(b), str(c)
    # hub id or local folder: from_pretrained handles both (and the huggingface_hub cache).
    local = [resolve(x) for x in (m["base"], m["controlnet"])]
    if m["kind"] == "local":
        missing = [str(p) for p in local if not (p / ("model_index.json" if p == local[0] else "config.json")).exists()]
        if missing:
            raise FileNotFoundError(
                f"profile {cfg['name']!r}: no model in {missing[0]} (models.kind local: the folders "
                "ship with the repository; for the tiny world, scripts/train_tiny_world.py rebuilds them)"
            )
    return tuple(str(p) if p.exists() else x for p, x in zip(local, (m["base"], m["controlnet"])))  # type: ignore


def prepare_loras(cfg: dict) -> list[dict]:
    """The catalog with files in place: tiny LoRAs are built; real ones must have been fetched."""
    catalog = load_catalog(cfg)
    if cfg["models"]["kind"] == "standin":
        from lorafind_utils.models.standins import ensure_tiny_loras

        base, _ = prepare_models(cfg)
        ensure_tiny_loras(catalog, lora_dir(cfg), base)
    elif cfg["models"]["kind"] == "local" and cfg["models"].get("loras"):
        install_shipped_loras(catalog, resolve(cfg["models"]["loras"]))
    missing = [e["path"] for e in catalog if not Path(e["path"]).exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} LoRA files are missing (e.g. {missing[0]}); run `lorafind fetch --profile {cfg['name']}`"
        )
    return catalog


def install_shipped_loras(catalog: list[dict], source: Path) -> None:
    """Copy the LoRA files shipped in ``source`` (the trained tiny world's ``data/tiny_world/loras``) into the
    profile's ``lora_dir`` (each entry's ``path``), so that what the study writes there (stage 07's trained LoRAs,
    ``lorafind index add``) never lands in the repository's data. A file already in place is kept when its
    SHA-256 is the catalog's; a shipped file whose hash is not the catalog's is refused, naming it."""
    import shutil

    from lorafind_utils.core.files import atomic_path, sha256_file

    for e in catalog:
        dest = Path(e["path"])
        want = e.get("sha256")
        if dest.exists() and (not want or sha256_file(dest) == want):
            continue
        src = Path(source) / e["file"]
        if not src.exists():
            raise FileNotFoundError(
                f"LoRA {e['slug']!r}: {src} is missing (the profile's models.loras folder ships it)"
            )
        if want and sha256_file(src) != want:
            raise ValueError(f"LoRA {e['slug']!r}: {src} does not match the catalog's sha256 {want[:12]}…; "
                             "the shipped file was changed")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def load_pipeline(cfg: dict, device: str | torch.device = "auto", dtype: str = "float32"):
    """SD1.5 ControlNet img2img pipeline, loaded with ``from_pretrained`` for both profiles.

    The scheduler is UniPC (from the checkpoint's own scheduler config), as
    diffusers recommends for ControlNet at ~20 steps.
    """
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    quiet_libraries()
    base, cn = prepare_models(cfg)
    device = pick_device(str(device))
    torch_dtype = DTYPES[dtype] if device.type != "cpu" else torch.float32
    controlnet = ControlNetModel.from_pretrained(cn, dtype=torch_dtype)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        base, controlnet=controlnet, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = getattr(diffusers, SCHEDULER).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_PIPES: dict = {}


def cached_pipeline(cfg: dict, dtype: str):
    """The profile's pipeline, loaded once per process (worker processes swap LoRAs on it)."""
    key = (cfg["models"]["base"], cfg["models"]["controlnet"], cfg["device"], dtype)
    if key not in _PIPES:
        _PIPES.clear()
        _PIPES[key] = load_pipeline(cfg, cfg["device"], dtype)
    return _PIPES[key]


def base_skeletons(cfg: dict):
    """The profile's UNet and text encoder on the meta device, built from their configs alone
    (no weights read): enough to check a LoRA's module names and shapes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base, _ = prepare_models(cfg)
    unet_cfg = UNet2DConditionModel.load_config(base, subfolder="unet")
    te_cfg = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_cfg), CLIPTextModel(te_cfg)
