"""The tiny stand-in models: real tokenizer, from_pretrained round trip, working ControlNet and VAE."""
import numpy as np
import torch
from PIL import Image

from lorafind_utils.models.standins import build_tiny_components


def test_tokenizer_ids_match_openai_clip(tiny_pipe):
    ids = tiny_pipe.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tiny_pipe.tokenizer) == 49408


def test_saved_models_reload_with_the_seeded_weights(tiny_pipe):
    fresh = build_tiny_components(0)
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        a = dict(fresh[name].named_parameters())
        b = dict(getattr(tiny_pipe, name).named_parameters())
        k = sorted(a)[len(a) // 2]
        torch.testing.assert_close(a[k], b[k].detach(), msg=f"{name}.{k}")


def test_vae_keeps_image_content(tiny_pipe, tiny_cfg):
    from lorafind_utils.core.config import resolve
    from lorafind_utils.core.images import load_rgb, read_base_set, square_resize

    b = read_base_set(resolve(tiny_cfg["base_images"]["variety"]))[0]
    x = (
        torch.tensor(np.asarray(square_resize(load_rgb(b.path), 64)), dtype=torch.float32).permute(2, 0, 1)[None]
        / 127.5
        - 1
    )
    with torch.no_grad():
        y = tiny_pipe.vae.decode(tiny_pipe.vae.encode(x).latent_dist.mean).sample
    assert np.corrcoef(x.flatten(), y.flatten())[0, 1] > 0.8


def test_control_image_steers_the_output(tiny_pipe):
    init = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255
    kw = dict(prompt="", image=init, strength=0.5, num_inference_steps=4, output_type="np")
    a = tiny_pipe(control_image=Image.fromarray(edges), generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = tiny_pipe(
        control_image=Image.fromarray(np.zeros_like(edges)), generator=torch.Generator().manual_seed(0), **kw
    ).images[0]
    assert np.abs(a - b).mean() > 0.005  # an un-initialised ControlNet gives ~2e-6
