"""Reading images safely and the base-image sets (folder + manifest.csv)."""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: Refuse images whose pixel count exceeds this (decompression bombs); ~ 16k x 16k.
MAX_PIXELS = 256_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MANIFEST_COLUMNS = ("file", "subject", "category", "source", "license")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open any common image as 8-bit RGB, applying its EXIF orientation.

    Handles RGBA/LA/P with transparency (composited on white), greyscale, 16-bit
    and 32-bit integer/float modes, CMYK and animated GIF/WebP (first frame).

    :raises ImageError: empty, truncated, not an image, or too large to decode safely.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path.name}: empty file")
    return _decode(path, path.name, max_pixels)


def load_rgb_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """:func:`load_rgb` for bytes in memory (an upload); ``name`` is used in error messages."""
    import io

    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(bytes(data)), name, max_pixels)


def _decode(src, name: str, max_pixels: int) -> Image.Image:
    # Pillow's own bomb guard warns at 89.5 MP and refuses at twice that; ours is ``max_pixels``
    # (256 MP by default), checked from the header before any pixel is decoded.
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(
                        f"{name}: {im.width}x{im.height} pixels is too large to decode safely (limit {max_pixels:,})"
                    )
                im.load()
                return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: too large to decode safely (limit {max_pixels:,} pixels)") from None
    except Exception as e:  # PIL raises many types for bad files
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to upright 8-bit RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize (the pipeline works on square images)."""
    return ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class BaseImage:
    """One base image of a set: its id (file stem) and manifest row."""

    id: str
    path: Path
    subject: str = ""
    category: str = ""
    source: str = ""
    license: str = ""


def read_base_set(folder: str | Path) -> list[BaseImage]:
    """Read a base-image set: ``manifest.csv`` (file, subject, category, source, license) + the files.

    :raises FileNotFoundError: no folder or no manifest (says how to make one).
    :raises ValueError: the manifest and the folder disagree (names the files).
    """
    folder = Path(folder)
    man = folder / "manifest.csv"
    if not folder.is_dir():
        raise FileNotFoundError(f"base-image folder {folder} does not exist (see README: 'Base images')")
    if not man.exists():
        raise FileNotFoundError(
            f"{man} is missing: a base-image set needs a manifest.csv with columns {', '.join(MANIFEST_COLUMNS)}"
        )
    with open(man, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{man}: no rows")
    missing_cols = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing_cols:
        raise ValueError(f"{man}: missing columns {missing_cols}")
    listed = [r["file"] for r in rows]
    dupes = sorted({f for f in listed if listed.count(f) > 1})
    if dupes:
        raise ValueError(f"{man}: files listed twice: {dupes[:5]}")
    on_disk = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    absent = [f for f in listed if f not in on_disk]
    extra = sorted(on_disk - set(listed))
    if absent or extra:
        raise ValueError(
            f"{man} disagrees with the folder: {len(absent)} listed but missing (e.g. {absent[:3]}), "
            f"{len(extra)} present but not listed (e.g. {extra[:3]})"
        )
    ids = [Path(f).stem for f in listed]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{man}: two files share a name stem; ids must be unique")
    return [
        BaseImage(Path(r["file"]).stem, folder / r["file"], r["subject"], r["category"], r["source"], r["license"])
        for r in rows
    ]


def canny_edges(im: Image.Image | np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Stage 01's control edges: OpenCV Canny of the image's PIL greyscale (``convert("L")``), as a bool H x W map.
    Every ControlNet input of the project (stage 01, the tiny world's ControlNet and bridge-LoRA training) uses
    this one definition, so what a model was trained on is what the pipeline feeds it."""
    import cv2

    pil = im if isinstance(im, Image.Image) else Image.fromarray(np.ascontiguousarray(np.asarray(im, dtype=np.uint8)))
    return cv2.Canny(np.asarray(pil.convert("L")), int(low), int(high)) > 0


def control_maps(photos_u8, low: int = 100, high: int = 200):
    """:func:`canny_edges` of uint8 N x 3 x H x W photos as the ControlNet pipeline feeds them: a float tensor
    N x 3 x H x W in 0..1."""
    import torch

    maps = [canny_edges(x.permute(1, 2, 0).numpy(), low, high) for x in photos_u8]
    return torch.from_numpy(np.stack(maps)).float()[:, None].repeat(1, 3, 1, 1)
