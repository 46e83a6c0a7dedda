"""Restyle images with a loaded pipeline: control maps, per-item seeds, batches, one LoRA's jobs
(shared by stage 01, the index operations, the Ray engine and the benchmarks)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorafind_utils.core.files import atomic_path
from lorafind_utils.core.images import BaseImage, ImageError, canny_edges, load_rgb, square_resize
from lorafind_utils.models.loras import load_lora


def item_seed(seed: int, lora: str, image_id: str) -> int:
    """A per-image seed from (run seed, LoRA, base image): independent of batch size and order."""
    h = hashlib.sha256(f"{seed}|{lora}|{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def canny_image(im: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV Canny edges of an RGB image as a 3-channel control image (white edges on black)."""
    edges = canny_edges(im, low, high).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


@dataclass
class Prepared:
    """A base image decoded, resized and edge-detected once, reused for every LoRA."""

    image: BaseImage
    init: Image.Image
    control: Image.Image


def prepare_image(base: BaseImage, im: Image.Image, resolution: int, low: int = 100, high: int = 200) -> Prepared:
    """A decoded base image squared to ``resolution`` with its Canny edges (the pipeline's inputs)."""
    im = square_resize(im, resolution)
    return Prepared(base, im, canny_image(im, low, high))


def prepare_base_images(
    images: list[BaseImage], resolution: int, low: int, high: int
) -> tuple[list[Prepared], list[dict]]:
    """Decode + resize + Canny every base image once; unreadable ones are returned as skips."""
    ok, skipped = [], []
    for b in images:
        try:
            ok.append(prepare_image(b, load_rgb(b.path), resolution, low, high))
        except ImageError as e:
            skipped.append({"image": b.id, "file": b.path.name, "reason": str(e)})
    return ok, skipped


def restyle(pipe, prepared: list[Prepared], seeds: list[int], p: dict, prompt: str = "",
            callback=None) -> list[Image.Image]:
    """One pipeline call for a batch: each image gets its own CPU generator.

    With an empty prompt and no negative prompt the conditional and unconditional
    embeddings are identical, so classifier-free guidance changes nothing but
    doubles the UNet work: it is skipped (guidance 1.0).

    :param p: ``strength``, ``steps``, ``controlnet_scale``, ``guidance_scale`` (stage 01's parameters).
    :param callback: diffusers' ``callback_on_step_end`` (the widget's progress bar).
    """
    guidance = float(p["guidance_scale"]) if prompt else 1.0
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    extra = {"callback_on_step_end": callback} if callback else {}
    out = pipe(
        prompt=[prompt] * len(prepared),
        image=[x.init for x in prepared],
        control_image=[x.control for x in prepared],
        strength=float(p["strength"]),
        num_inference_steps=int(p["steps"]),
        controlnet_conditioning_scale=float(p["controlnet_scale"]),
        guidance_scale=guidance,
        generator=gens,
        output_type="pil",
        **extra,
    )
    return out.images


SYNTH_KEYS = (
    "resolution",
    "steps",
    "strength",
    "controlnet_scale",
    "guidance_scale",
    "canny_low",
    "canny_high",
    "seed",
    "dtype",
)


def batches(items: list, batch_size: int) -> list[list]:
    """A LoRA's items in fixed batches of ``batch_size``, in catalog order.

    The batches are the same in every run, and a resumed run redoes a whole batch when any of
    its images is missing or broken: an image's pixels come from the same pipeline call (the same
    batch) as in an uninterrupted run, so a resumed run is byte-identical to one that was never
    killed -- also where the CPU's summation order depends on the batch.
    """
    bs = max(1, int(batch_size))
    return [items[i : i + bs] for i in range(0, len(items), bs)]


def restyle_with_lora(pipe, entry: dict, chunks: list[list], params: dict, out_dir: Path, on_batch=None) -> int:
    """Load one LoRA, restyle its batches [[(prepared, file, seed), ...], ...] (one pipeline call
    each), unload it. Each PNG is written atomically as soon as its batch is done."""
    load_lora(pipe, entry["path"], entry["slug"], weight=1.0)  # each LoRA loaded once
    n = 0
    try:
        for chunk in chunks:
            outs = restyle(pipe, [t[0] for t in chunk], [t[2] for t in chunk], params)
            for (_, rel, _), im in zip(chunk, outs):
                with atomic_path(out_dir / rel) as tmp:
                    im.save(tmp, format="PNG")
            n += len(chunk)
            if on_batch:
                on_batch(len(chunk))
    finally:
        pipe.unload_lora_weights()
    return n


def finished(path: Path) -> bool:
    """A restyled image that exists and decodes completely (a truncated or garbage file is redone)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # PIL raises many types for broken files
        return False
