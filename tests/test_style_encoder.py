"""The ``gramstats`` style encoder: fitted (not trained) on some styles, it still groups styles it never
saw; it saves and loads through its own files and refuses damaged ones."""
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafind_utils.core.images import load_rgb, square_resize
from lorafind_utils.core.styles import apply_style
from lorafind_utils.models.style_encoder import fit_gramstats, load_gramstats

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
FIT_STYLES = ["cartoon", "sepia print", "oil paint", "pastel cloud", "watercolour", "neon glow"]
NEW_STYLES = ["pencil sketch", "pixel art", "pop art halftone"]  # never in the fit


def _uint8(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) for im in images])


@pytest.fixture(scope="module")
def photos():
    files = sorted((ROOT / "data" / "images" / "variety").glob("*.jpg"))[:24]
    return [square_resize(load_rgb(f), 128) for f in files]


@pytest.fixture(scope="module")
def encoder(photos):
    fit = [square_resize(apply_style(s, p), SIZE) for s in FIT_STYLES for p in photos[:12]]
    fit += [square_resize(p, SIZE) for p in photos[:12]]
    return fit_gramstats(_uint8(fit), "efficientnet_lite0", "imagenet", SIZE, dim=48)


def test_styles_left_out_of_the_fit_are_told_apart_on_new_photos(encoder, photos):
    # 4 reference images per new style (as `index add` makes an entry), 8 held-out queries each
    refs = {s: encoder.embed(_uint8([square_resize(apply_style(s, p), SIZE) for p in photos[12:16]]))
            for s in NEW_STYLES}
    protos = np.stack([r.mean(0) / np.linalg.norm(r.mean(0)) for r in refs.values()])
    hits, n = 0, 0
    for i, s in enumerate(NEW_STYLES):
        z = encoder.embed(_uint8([square_resize(apply_style(s, p), SIZE) for p in photos[16:24]]))
        hits += int(((z @ protos.T).argmax(1) == i).sum())
        n += len(z)
    assert hits / n >= 0.9, f"{hits}/{n} queries of unseen styles found their style"


def test_embeddings_are_unit_vectors_of_the_fitted_size(encoder, photos):
    z = encoder.embed(_uint8([square_resize(p, SIZE) for p in photos[:3]]))
    assert z.shape == (3, 48) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert encoder.describe()["name"] == "gramstats" and encoder.describe()["n_fit"] == 7 * 12


def test_save_and_load_give_the_same_vectors_and_identity(encoder, photos, tmp_path):
    folder = encoder.save(tmp_path / "enc")
    back = load_gramstats(folder, "efficientnet_lite0", "imagenet", SIZE)
    x = _uint8([square_resize(apply_style("pixel art", p), SIZE) for p in photos[:4]])
    assert np.allclose(back.embed(x), encoder.embed(x), atol=1e-5)
    assert back.describe() == encoder.describe() and len(encoder.describe()["sha256"]) == 64


def test_a_damaged_or_missing_encoder_is_refused_by_name(encoder, tmp_path):
    folder = encoder.save(tmp_path / "enc")
    (folder / "encoder.safetensors").write_bytes(b"not tensors")
    with pytest.raises(ValueError, match=r"enc: the gramstats style encoder cannot be loaded"):
        load_gramstats(folder, "efficientnet_lite0", "imagenet", SIZE)
    with pytest.raises(ValueError, match=r"no gramstats style encoder in .*missing"):
        load_gramstats(tmp_path / "nowhere", "efficientnet_lite0", "imagenet", SIZE)
