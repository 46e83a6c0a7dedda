"""The committed base-image sets: enough unique, licensed, real images with a manifest."""
import hashlib
from collections import Counter

import numpy as np
from PIL import Image

from lorafind_utils.core.config import load_profile, resolve
from lorafind_utils.core.images import read_base_set


def _check(name, minimum):
    imgs = read_base_set(resolve(load_profile("tiny")["base_images"][name]))
    assert len(imgs) >= minimum
    for b in imgs:
        assert b.source and b.license and b.subject, f"{b.path.name}: manifest row incomplete"
    digests = Counter(hashlib.sha256(b.path.read_bytes()).hexdigest() for b in imgs)
    assert digests.most_common(1)[0][1] == 1, "duplicate files"
    # no near-duplicates posing as distinct images: compare 8x8 grey thumbnails
    th = np.stack([np.asarray(Image.open(b.path).convert("L").resize((8, 8)), dtype=float).ravel() for b in imgs])
    th = (th - th.mean(1, keepdims=True)) / (th.std(1, keepdims=True) + 1e-6)
    corr = th @ th.T / th.shape[1]
    np.fill_diagonal(corr, 0)
    assert corr.max() < 0.995, "near-identical images"
    return imgs


def test_variety_set():
    imgs = _check("variety", 126)
    cats = Counter(b.category for b in imgs)
    assert len(cats) >= 5, cats


def test_faces_set():
    imgs = _check("faces", 70)
    assert {b.category for b in imgs} == {"people"}
