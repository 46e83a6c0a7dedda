"""Named image styles as code: the tiny profile's 12 styles, one per catalog LoRA.

Each LoRA of the tiny catalog (``data/tiny_world/catalog.yaml``, named after the paper's Table 1) is
trained on photos passed through one of these styles, so "which LoRA paints like this image"
has a checkable answer. Every style is a documented, deterministic image operation: a PIL RGB
image in, a PIL RGB image of the same size out, byte-identical for the same input (any
randomness, e.g. paper texture, comes from a fixed ``seed``). Kernel sizes, grid cells and
halftone periods scale with the image, so a style reads the same from 48 px to 512 px.

Two pairs are near-twins on purpose, like the paper's "Anime" and "Anime background":

- ``cartoon`` (anime) vs ``cartoon background`` (anime_background): the same flat-colour
  cartoon; the background variant has thinner, softer edges and a brighter, more saturated
  palette.
- ``watercolour`` (illustration) vs ``light watercolour`` (realistic): the same watercolour;
  the light variant smooths less and puts on less paper texture and edge darkening.

:func:`apply_style` applies one by style name or LoRA slug, :func:`list_styles` describes
them all, :func:`apply_to_files` restyles image files into a folder of PNGs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lorafind_utils.core.files import atomic_path
from lorafind_utils.core.images import load_rgb

#: Seed of every style's randomness (paper texture) unless a ``seed`` is passed.
DEFAULT_SEED = 0


# --------------------------------------------------------------------------- helpers


def _rgb(image: Image.Image) -> np.ndarray:
    """The image as a C-contiguous uint8 HxWx3 array (converted to RGB if needed)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _out(a: np.ndarray) -> Image.Image:
    """A float or int array, clipped and rounded, as a PIL RGB image."""
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def _side(a: np.ndarray) -> int:
    """The image's short side: every size-dependent parameter scales with it."""
    return int(min(a.shape[0], a.shape[1]))


def _odd(x: float, minimum: int = 3) -> int:
    """An odd kernel size of about ``x`` (at least ``minimum``), as OpenCV needs."""
    k = max(int(minimum), round(x))
    return k if k % 2 else k + 1


def _grey(a: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)


def _sigma(a: np.ndarray, frac: float, minimum: float = 0.5) -> float:
    """A blur sigma of ``frac`` of the short side (never below ``minimum`` pixels)."""
    return max(minimum, frac * _side(a))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _quantize(a: np.ndarray, colours: int) -> np.ndarray:
    """Median-cut palette of ``colours`` entries, no dithering.

    PIL's median cut is deterministic; OpenCV's k-means would draw on a global RNG.
    """
    q = Image.fromarray(a, "RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return np.asarray(q.convert("RGB"), dtype=np.uint8)


def _saturate(a: np.ndarray, sat: float = 1.0, val: float = 1.0, val_add: float = 0.0) -> np.ndarray:
    """Scale saturation and value in HSV (uint8 in, uint8 out)."""
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * val + val_add, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _per_colour(a: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (a uint8 colour-to-colour transform such as :func:`_saturate`) applied once per distinct colour of ``a``.

    OpenCV's SIMD and scalar paths may round the same colour differently at different pixels (and CPUs with and
    without AVX-512 differ in which pixels take which path); mapping the palette keeps a palette a palette: every
    pixel of one colour gets one result, so a style's colour count is the same on every CPU.
    """
    pal, inv = np.unique(a.reshape(-1, 3), axis=0, return_inverse=True)
    out = fn(np.ascontiguousarray(pal[None]))[0]
    return out[inv.reshape(-1)].reshape(a.shape)


def _smooth(a: np.ndarray, passes: int, strength: float = 1.0) -> np.ndarray:
    """Edge-preserving smoothing: ``passes`` bilateral filters sized to the image."""
    d = _odd(_side(a) / 24 * strength, 3)
    out = a
    for _ in range(passes):
        out = cv2.bilateralFilter(out, d, 40 * strength, d)
    return out


def _stretch(g: np.ndarray) -> np.ndarray:
    """A grey float image stretched to 0..1 between its 2nd and 98th percentiles (dull photos get full tone)."""
    lo, hi = np.percentile(g, (2, 98))
    return np.clip((g - lo) / max(float(hi - lo), 1.0), 0, 1)


#: Edges are found at no more than this short side (then scaled up): Canny's gradients, and
#: so which lines it finds, would otherwise change with the image size.
EDGE_SIDE = 128


def _edges(a: np.ndarray, thickness: int = 1, blur_frac: float = 1 / 96, top: float | None = None) -> np.ndarray:
    """Canny edges of the lightly blurred grey image as a 0..1 float map, lines about ``thickness`` px wide.

    Thresholds follow the image's own median so dull and contrasty photos both get lines; with
    ``top`` they follow its gradients instead, so only about that fraction of pixels (the
    strongest gradients) can start a line, however busy the photo.
    Images bigger than :data:`EDGE_SIDE` are searched at that size and the map scaled back up
    (soft-edged), so a 512 px image gets the same lines as a 128 px one, only thicker.
    """
    h, w = a.shape[:2]
    side = _side(a)
    f = min(1.0, EDGE_SIDE / side)
    work = a if f == 1.0 else cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    g = _blur(_grey(work), _sigma(work, blur_frac, 0.7))
    if top is None:
        m = float(np.median(g))
        lo, hi = max(10.0, 0.45 * m), max(30.0, 1.0 * m)
    else:  # Canny's own gradient (L1 Sobel), so the percentile means what Canny will see
        mag = np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(g, cv2.CV_32F, 0, 1))
        hi = max(30.0, float(np.percentile(mag, 100 * (1 - top))))
        lo = 0.5 * hi
    e = cv2.Canny(g, lo, hi)
    t = max(1, round(thickness * f))
    if t > 1:
        e = cv2.dilate(e, np.ones((t, t), np.uint8))
    e = (e > 0).astype(np.float32)
    if f < 1.0:
        e = np.clip(cv2.resize(e, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)
    return e


def _grad(a: np.ndarray, blur_frac: float) -> np.ndarray:
    """Sobel gradient magnitude of the blurred grey image, scaled to 0..1 by its 98th percentile."""
    g = _blur(_grey(a).astype(np.float32), _sigma(a, blur_frac, 0.5))
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    m = np.sqrt(gx * gx + gy * gy)
    return np.clip(m / max(float(np.percentile(m, 98)), 1e-3), 0, 1)


def _paper(shape: tuple[int, int], seed: int, side: int) -> np.ndarray:
    """Paper texture around 0 (float32 HxW): fine grain plus soft blotches, both sized to ``side``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    grain = _blur(rng.standard_normal((h, w)).astype(np.float32), max(0.8, side / 110))
    blot = _blur(rng.standard_normal((h, w)).astype(np.float32), max(1.5, side / 14))
    grain /= max(float(grain.std()), 1e-6)
    blot /= max(float(blot.std()), 1e-6)
    # granulation blotches dominate; the grain only roughens them
    return 0.35 * grain + 0.65 * blot


# --------------------------------------------------------------------------- the 12 styles


def cartoon(image: Image.Image, colours: int = 8) -> Image.Image:
    """Cartoon: bilateral-smoothed flat colours (median-cut palette) with bold dark edges.

    :param image: RGB image.
    :param colours: palette size of the flat colours.
    """
    a = _rgb(image)
    flat = _quantize(_smooth(a, passes=3), colours)
    # bold lines: 2 px up to 160 px, thicker on bigger images;
    # found on a slightly blurred image so texture (grass, leaves) does not become lines
    e = _edges(a, thickness=max(2, round(_side(a) / 64)), blur_frac=1 / 64)
    ink = np.array([22, 18, 28], np.float32)
    out = flat.astype(np.float32) * (1 - e[..., None]) + ink * e[..., None]
    return _out(out)


def cartoon_background(image: Image.Image, colours: int = 12) -> Image.Image:
    """Cartoon background: the cartoon's flat colours, brighter and more saturated, with thin soft edges.

    Near-twin of :func:`cartoon` (the paper's "Anime" vs "Anime background").

    :param image: RGB image.
    :param colours: palette size of the flat colours.
    """
    a = _rgb(image)
    # brighten/saturate before quantizing so the palette itself is the brighter one
    bright = _saturate(_smooth(a, passes=3), sat=1.35, val=1.05, val_add=14)
    flat = _quantize(bright, colours).astype(np.float32)
    # the same lines, half as thick and softened: they darken the colour beneath instead of inking over it
    e = _edges(a, thickness=max(1, round(_side(a) / 128)), blur_frac=1 / 64)
    e = _blur(e, 0.4) * 0.75
    return _out(flat * (1 - e[..., None]))


def sepia_print(image: Image.Image) -> Image.Image:
    """Sepia print: a warm paper-toned duotone, dark brown ink on cream paper.

    :param image: RGB image.
    """
    a = _rgb(image)
    g = _grey(a).astype(np.float32) / 255
    g = np.clip((g - 0.5) * 1.15 + 0.52, 0, 1)  # a touch more contrast, like a print
    ink = np.array([70, 38, 18], np.float32)
    paper = np.array([244, 226, 186], np.float32)
    # curve toward the paper so mid-tones stay warm rather than muddy
    t = g[..., None] ** 0.85
    return _out(ink * (1 - t) + paper * t)


def ink_wash(image: Image.Image) -> Image.Image:
    """Ink wash: soft grey washes of diluted ink on white paper, dark brush strokes along edges.

    :param image: RGB image.
    """
    a = _rgb(image)
    g = _stretch(_grey(a).astype(np.float32))
    wash = _blur(g, _sigma(a, 1 / 64, 0.8))
    # four diluted-ink levels, then blurred so each wash bleeds into the next
    levels = np.clip(np.round(wash * 3) / 3, 0, 1)
    wash = _blur(levels, _sigma(a, 1 / 70, 0.8))
    wash = 0.3 + 0.7 * wash ** 0.8  # the darkest wash is dark grey; black is kept for the strokes
    # strokes: where the blurred tones change fast, a soft-edged brush line of varying weight
    gr = _grad(a, 1 / 96)
    stroke = np.clip((gr - 0.35) / 0.45, 0, 1)
    stroke = _blur(stroke, _sigma(a, 1 / 200, 0.4))
    out = wash * (1 - 0.92 * stroke)
    return _out(out * 255)


def _kuwahara(a: np.ndarray, radius: int) -> np.ndarray:
    """Kuwahara filter: each pixel takes the mean colour of the least varied of its four corner windows.

    Flattens texture into paint-like patches while keeping edges sharp; box filters make it cheap.
    """
    f = a.astype(np.float32)
    lum = f.mean(axis=2)
    k = (radius + 1, radius + 1)
    best_var = None
    out = np.zeros_like(f)
    # anchor = the pixel's place in the window: windows up-left, up-right, down-left, down-right of it
    for anchor in ((radius, radius), (0, radius), (radius, 0), (0, 0)):
        mean = cv2.blur(f, k, anchor=anchor, borderType=cv2.BORDER_REFLECT)
        m = cv2.blur(lum, k, anchor=anchor, borderType=cv2.BORDER_REFLECT)
        var = cv2.blur(lum * lum, k, anchor=anchor, borderType=cv2.BORDER_REFLECT) - m * m
        if best_var is None:
            best_var, out = var, mean
        else:
            pick = var < best_var
            best_var = np.where(pick, var, best_var)
            out = np.where(pick[..., None], mean, out)
    return np.clip(out, 0, 255).astype(np.uint8)


def oil_paint(image: Image.Image) -> Image.Image:
    """Oil paint: Kuwahara-filtered paint patches with boosted contrast and saturated colour.

    :param image: RGB image.
    """
    a = _rgb(image)
    # two passes: the second merges the first's patches into broader strokes
    r = max(2, round(_side(a) / 28))
    p = _kuwahara(_kuwahara(a, r), max(1, r // 2))
    f = p.astype(np.float32)
    f = (f - f.mean()) * 1.4 + f.mean()  # disco: punchy contrast
    return _out(_saturate(np.clip(f, 0, 255).astype(np.uint8), sat=1.7))


def pastel_cloud(image: Image.Image) -> Image.Image:
    """Pastel cloud: heavy blur, lifted shadows and low-contrast pastel colours.

    :param image: RGB image.
    """
    a = _rgb(image)
    soft = _blur(a.astype(np.float32), _sigma(a, 1 / 22, 1.5))
    soft = _saturate(np.clip(soft, 0, 255).astype(np.uint8), sat=1.3).astype(np.float32)
    # lift shadows by mixing toward a pale sky tint: contrast drops, colour stays pastel
    tint = np.array([236, 232, 248], np.float32)
    return _out(soft * 0.45 + tint * 0.55)


def pencil_sketch(image: Image.Image) -> Image.Image:
    """Pencil sketch: colour-dodge of the grey image over its blurred negative (grey lines on white).

    :param image: RGB image.
    """
    a = _rgb(image)
    g = _grey(a).astype(np.float32)
    inv_blur = _blur(255 - g, _sigma(a, 1 / 40, 1.0))
    dodge = np.clip(g * 255 / np.maximum(255 - inv_blur, 1), 0, 255)
    # the dodge alone is faint at small sizes: a gamma darkens the strokes like a softer lead
    out = 255 * (dodge / 255) ** 2.2
    return _out(out)


def neon_glow(image: Image.Image) -> Image.Image:
    """Neon glow: bright, fully saturated edges in the photo's own hues, glowing on a dark background.

    :param image: RGB image.
    """
    a = _rgb(image)
    # only the strongest edges light up, else a leafy photo turns into a solid sheet of light
    e = _edges(a, thickness=1, blur_frac=1 / 80, top=0.08)
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = 255
    hsv[..., 2] = 255
    neon = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    glow = _blur(e, _sigma(a, 1 / 40, 1.2))
    glow = glow / max(float(glow.max()), 1e-6)
    light = np.clip(e + 1.2 * glow, 0, 1)[..., None]
    dark = a.astype(np.float32) * 0.12  # a faint trace of the scene so it is not pure black
    core = e[..., None] * 0.35 * 255  # white-hot centre of each tube
    return _out(dark + neon * light + core)


def pixel_art(image: Image.Image, cell: int | None = None, colours: int = 8) -> Image.Image:
    """Pixel art: average over a coarse grid, quantize to a small palette, upscale with nearest neighbour.

    Cells start at the top-left corner; the last row/column of cells may be cut off.

    :param image: RGB image.
    :param cell: cell size in pixels; default an eighth of the short side (at least 2): 8-px cells at 64 px,
        two latent cells of a 4x-down codec, coarse enough for the 64-px tiny world to paint.
    :param colours: palette size.
    """
    a = _rgb(image)
    h, w = a.shape[:2]
    c = int(cell) if cell else max(2, round(_side(a) / 8))
    gh, gw = -(-h // c), -(-w // c)
    # pad to whole cells (edge pixels repeated) so every cell is an average of real pixels
    pad = cv2.copyMakeBorder(a, 0, gh * c - h, 0, gw * c - w, cv2.BORDER_REPLICATE)
    small = cv2.resize(pad, (gw, gh), interpolation=cv2.INTER_AREA)
    small = _quantize(_saturate(small, sat=1.25), colours)
    big = np.repeat(np.repeat(small, c, axis=0), c, axis=1)
    return _out(big[:h, :w])


def pop_art_halftone(image: Image.Image, colours: int = 4) -> Image.Image:
    """Pop art halftone: a few strong colours printed as halftone dots on white, with black outlines.

    :param image: RGB image.
    :param colours: number of posterised colours.
    """
    a = _rgb(image)
    h, w = a.shape[:2]
    flat = _quantize(_smooth(a, passes=1), colours)
    # push the palette to loud, fully saturated inks (comic-book primaries)
    strong = _per_colour(flat, lambda p: _saturate(p, sat=2.5, val=1.1, val_add=20)).astype(np.float32)
    g = _grey(flat).astype(np.float32) / 255
    # 45-degree dot screen; period a tenth of the image, never under 6 px (6.4 px at 64 px: coarser than the
    # tiny world's 4x-down latent cell, so a codec can carry the dots; smaller dots blur into a tint)
    p = max(6.0, _side(a) / 10)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx + yy) / np.sqrt(2), (xx - yy) / np.sqrt(2)
    du = (u / p) % 1 - 0.5
    dv = (v / p) % 1 - 0.5
    r = np.sqrt(du * du + dv * dv)  # 0 at a dot centre, 0.71 at a cell corner
    radius = 0.25 + 0.45 * (1 - g)  # darker tones, bigger dots
    dot = (r < radius)[..., None]
    paper = np.array([252, 248, 236], np.float32)
    light = strong * 0.35 + paper * 0.65
    out = np.where(dot, strong, light)
    # outlines only around big shapes: the dots, not the lines, should carry the texture
    e = _edges(a, thickness=max(1, round(_side(a) / 96)), blur_frac=1 / 40)[..., None]
    return _out(np.where(e > 0.5, 15.0, out))


def _patches(a: np.ndarray, radius_frac: float, colour_range: float) -> np.ndarray:
    """Mean-shift colour patches (OpenCV's pyramid version, so big images stay fast)."""
    side = _side(a)
    level = max(0, round(np.log2(max(side, 1) / 96))) + 1
    sp = max(2.0, side * radius_frac / 2 ** (level - 1))
    return cv2.pyrMeanShiftFiltering(a, sp, colour_range, maxLevel=level)


def _watercolour(a: np.ndarray, seed: int, patch: float, texture: float, darken: float, wash: float) -> np.ndarray:
    """The shared watercolour recipe (see :func:`watercolour`); the parameters set how heavy-handed it is."""
    side = _side(a)
    # washes of flat colour (mean shift), then bled into each other with a soft blur
    col = _patches(a, patch, 30) if patch else a
    col = _blur(col, _sigma(a, 1 / 130, 0.5))
    # pigment pools at wash boundaries: darkening follows the gradient of the washes
    edge = _blur(_grad(col, 1 / 120), _sigma(a, 1 / 120, 0.5))
    col = _saturate(col, sat=1.1).astype(np.float32) / 255
    # transparent washes: colour thins toward the white paper
    col = col * (1 - wash) + wash
    col = col * (1 - darken * edge[..., None])
    paper = _paper(a.shape[:2], seed, side)
    col = col * (1 + texture * paper[..., None])
    return np.clip(col, 0, 1) * 255


def watercolour(image: Image.Image, seed: int = DEFAULT_SEED) -> Image.Image:
    """Watercolour: smoothed, bleeding colours thinned toward white paper, paper texture, soft edge darkening.

    :param image: RGB image.
    :param seed: seed of the paper texture (fixed by default, so the output is deterministic).
    """
    return _out(_watercolour(_rgb(image), seed, patch=1 / 12, texture=0.08, darken=0.4, wash=0.22))


def light_watercolour(image: Image.Image, seed: int = DEFAULT_SEED) -> Image.Image:
    """Light watercolour: the watercolour recipe, lighter-handed (less smoothing, texture and edge darkening).

    Near-twin of :func:`watercolour`.

    :param image: RGB image.
    :param seed: seed of the paper texture (fixed by default, so the output is deterministic).
    """
    return _out(_watercolour(_rgb(image), seed, patch=1 / 48, texture=0.03, darken=0.15, wash=0.08))


# ------------------------------------------------------- styles no LoRA of the catalog paints


def thermal(image: Image.Image) -> Image.Image:
    """Thermal camera: luminance through OpenCV's JET colour map (blue cold, red hot)."""
    g = (_stretch(_grey(_rgb(image)).astype(np.float32)) * 255).astype(np.uint8)
    return _out(cv2.cvtColor(cv2.applyColorMap(g, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB))


def emboss(image: Image.Image) -> Image.Image:
    """Embossed metal: a directional relief of the luminance on mid grey, slightly warm."""
    g = _grey(_rgb(image)).astype(np.float32)
    k = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
    r = cv2.filter2D(g, -1, k) * 0.5 + 128
    return _out(np.stack([r + 6, r, r - 8], axis=-1))


def negative(image: Image.Image) -> Image.Image:
    """Photographic negative with an orange film-base cast."""
    a = 255.0 - _rgb(image).astype(np.float32)
    return _out(a * np.array([1.0, 0.78, 0.55], np.float32) + np.array([40, 18, 0], np.float32))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Style:
    """One named style: its name, the slug and short name of the LoRA trained on it, the function."""

    name: str
    lora: str
    short: str
    fn: Callable[[Image.Image], Image.Image]
    doc: str


def _style(name: str, lora: str, short: str, fn: Callable) -> Style:
    return Style(name, lora, short, fn, (fn.__doc__ or "").strip().splitlines()[0])


#: The 12 styles in catalog order (``data/tiny_world/catalog.yaml``), keyed by style name.
STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        _style("cartoon", "anime", "Anime", cartoon),
        _style("cartoon background", "anime_background", "Anime background", cartoon_background),
        _style("sepia print", "xiaorensu", "Chinese style", sepia_print),
        _style("ink wash", "chinese_ink", "Chinese ink", ink_wash),
        _style("oil paint", "disco", "Disco", oil_paint),
        _style("pastel cloud", "cloudy", "Cloudy", pastel_cloud),
        _style("pencil sketch", "xsarchitecture", "XSarchitecture", pencil_sketch),
        _style("neon glow", "liuli", "LIULI", neon_glow),
        _style("pixel art", "pixel_art", "Pixel art", pixel_art),
        _style("pop art halftone", "pop_art", "Pop art", pop_art_halftone),
        _style("watercolour", "illustration", "Illustration", watercolour),
        _style("light watercolour", "realistic", "Realistic", light_watercolour),
    )
}


#: Styles that no catalog LoRA is trained on: the "none of these" queries of stage 08.
UNCATALOGUED: dict[str, Style] = {
    s.name: s
    for s in (
        _style("thermal", "", "", thermal),
        _style("emboss", "", "", emboss),
        _style("negative", "", "", negative),
    )
}


def style_names() -> list[str]:
    """The style names in catalog order."""
    return list(STYLES)


def get_style(name: str) -> Style:
    """The style called ``name``, or the one whose LoRA slug is ``name``.

    :raises ValueError: no such style (the message lists the known names and slugs).
    """
    if name in STYLES:
        return STYLES[name]
    if name in UNCATALOGUED:
        return UNCATALOGUED[name]
    for s in STYLES.values():
        if s.lora == name:
            return s
    known = ", ".join(f"{s.name!r} ({s.lora})" for s in STYLES.values())
    raise ValueError(f"unknown style {name!r}; known styles (LoRA slug): {known}")


def apply_style(name: str, image: Image.Image) -> Image.Image:
    """Apply the style ``name`` (style name or LoRA slug) to a PIL image; returns a new RGB image of the same size."""
    return get_style(name).fn(image)


def list_styles() -> list[dict[str, str]]:
    """One dict per style, in catalog order: ``style``, ``lora``, ``short``, ``description``."""
    return [{"style": s.name, "lora": s.lora, "short": s.short, "description": s.doc} for s in STYLES.values()]


def apply_to_files(name: str, paths, out_dir: str | Path) -> list[Path]:
    """Restyle image files into ``out_dir`` (created) as ``<stem>.png``, each written atomically.

    :param name: style name or LoRA slug.
    :param paths: image files (any format :func:`lorafind_utils.core.images.load_rgb` reads).
    :param out_dir: output folder.
    :returns: the written PNG paths, in input order.
    :raises ImageError: a file cannot be read (the message names it); files before it are written.
    :raises ValueError: unknown style, or two inputs share a stem (they would overwrite each other).
    """
    style = get_style(name)
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"inputs share a file stem and would overwrite each other: {dupes[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        im = style.fn(load_rgb(p))
        target = out_dir / f"{p.stem}.png"
        with atomic_path(target) as tmp:
            im.save(tmp, format="PNG")  # explicit: the temp name ends in .tmp
        written.append(target)
    return written


# --------------------------------------------------------------------------- telling styles apart


