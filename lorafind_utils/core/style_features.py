"""A hand-made style descriptor: tells the named styles apart without a learned model."""
from __future__ import annotations

import cv2
import numpy as np


def _log(x: float) -> float:
    """For fractions and ratios, whose order of magnitude is what tells styles apart."""
    return float(np.log(x + 1e-3))


def style_features(a, colour_moments: bool = False) -> np.ndarray:
    """A crude hand-made style descriptor of an RGB image: tone, colour, edges, palette size, blockiness and
    texture (26 numbers; ``colour_moments`` appends the per-channel mean and sd). The styles' own tests and the
    tiny world's checks of its LoRAs use it to tell styles apart without a learned model."""
    a = np.asarray(a)
    f = a.astype(np.float32) / 255
    g = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    gf = g.astype(np.float32) / 255
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV).astype(np.float32) / 255
    s, v = hsv[..., 1], hsv[..., 2]
    hue = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)[..., 0].astype(np.float32) / 180 * 2 * np.pi
    hue_conc = np.abs((s * np.exp(1j * hue)).sum()) / (s.sum() + 1e-6)  # 1: a single hue
    codes = (a[..., 0].astype(np.int32) << 16 | a[..., 1].astype(np.int32) << 8 | a[..., 2]).ravel()
    _, counts = np.unique(codes, return_counts=True)
    top8 = np.sort(counts)[::-1][:8].sum() / codes.size
    dx = np.any(a[:-1, 1:] != a[:-1, :-1], axis=2)
    dy = np.any(a[1:, :-1] != a[:-1, :-1], axis=2)
    diagonal = (dx & dy).sum() / max((dx | dy).sum(), 1)  # ~0 for axis-aligned blocks
    same = np.all(a[:, 1:] == a[:, :-1], axis=2).mean()
    lap = np.abs(cv2.Laplacian(gf, cv2.CV_32F)).mean()
    lap_coarse = np.abs(cv2.Laplacian(cv2.GaussianBlur(gf, (0, 0), 2), cv2.CV_32F)).mean()
    gm = np.sqrt(cv2.Sobel(gf, cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(gf, cv2.CV_32F, 0, 1) ** 2)
    edges = (cv2.Canny(g, 50, 150) > 0).mean()
    resid = np.abs(f - cv2.GaussianBlur(f, (0, 0), 1.5)).mean()
    chroma = (np.abs(f[..., 0] - f[..., 1]) + np.abs(f[..., 1] - f[..., 2])).mean()
    ddx = np.abs(np.diff(gf, axis=1))
    hist = np.histogram(g, bins=4, range=(0, 256))[0] / g.size
    return np.array([
        _log(np.median(ddx)), _log(np.percentile(ddx, 75)), gf.std(), s.mean(), np.percentile(s, 90),
        v.mean(), np.percentile(v, 10), _log((v < 0.15).mean()), _log((v > 0.9).mean()), _log(edges),
        np.log(len(counts)) / np.log(codes.size), top8, _log(diagonal), hue_conc, same, _log(lap),
        lap_coarse / (lap + 1e-3), gm.mean(), np.percentile(gm, 90), resid, chroma,
        (f[..., 0] - f[..., 2]).mean(), *hist,
        *((*f.reshape(-1, 3).mean(0), *f.reshape(-1, 3).std(0)) if colour_moments else ()),
    ])
