"""Stage 07: style-LoRA training (data checks, both layouts round trip, resume) and metric sanity cases."""
import numpy as np
import pytest
import torch
from PIL import Image

from lorafind_utils import resolve
from lorafind_utils.models.lora_training import StyleDataError, check_ranks, read_style_set, split_style_set, train_lora
from lorafind_utils.stages.style_lora import make_demo_style_set, register


@pytest.fixture(scope="module")
def style_set(tmp_path_factory):
    d = make_demo_style_set(
        resolve("data/images/variety"), tmp_path_factory.mktemp("style") / "set", n=8, resolution=32
    )
    return read_style_set(d, resolution=32)


def test_style_set_problems_are_reported_before_training(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 10, 10)).save(d / f"img{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "captions.csv").write_text("file,caption\nimg0.png,a\nimg1.png,b\nimg2.png,c\nbroken.png,d\nghost.png,e\n")
    with pytest.raises(StyleDataError) as e:
        read_style_set(d)
    assert "captions name missing images: ghost.png" in str(e.value) and "broken.png: not a readable image" in str(
        e.value
    )
    (d / "broken.png").unlink()
    (d / "captions.csv").write_text("file,caption\nimg0.png,a\nimg1.png,b\nimg2.png,c\n")
    with pytest.raises(StyleDataError, match="3 usable images, at least 4"):
        read_style_set(d)
    items = read_style_set(d, min_images=3)
    with pytest.raises(StyleDataError, match="too few to hold out"):
        split_style_set(items, 0.25)
    (d / "captions.csv").unlink()
    with pytest.raises(StyleDataError, match="no captions.csv"):
        read_style_set(d, min_images=3)
    assert (
        read_style_set(d, "{name}, in the style of {style}", "ink", min_images=3)[0].caption
        == "img0, in the style of ink"
    )
    for bad in (0, -4, 2.5, "8", True):
        with pytest.raises(ValueError, match="not a positive integer"):
            check_ranks([4, bad])
    assert check_ranks([4, 128]) == [4, 128]


def _pipe(cfg):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        cfg["models"]["base"], safety_checker=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe):
    return pipe(prompt=["a house, in the style of duotone poster"], num_inference_steps=3, guidance_scale=1.0,
                height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_training_lowers_the_loss_and_both_layouts_load_back_to_the_same_output(tiny_cfg, catalog, style_set, tmp_path):
    from lorafind_utils.models.loras import inspect_lora, load_lora

    train, _ = split_style_set(style_set, 0.25, 0)
    res = train_lora(
        tiny_cfg["models"]["base"],
        train,
        tmp_path / "r4",
        rank=4,
        alpha=8,
        steps=40,
        lr=2e-3,
        batch_size=4,
        checkpoint_every=20,
        progress=False,
    )
    losses = [h["loss"] for h in res["history"]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert inspect_lora(res["kohya"]).layout == "kohya" and inspect_lora(res["kohya"]).rank == 4
    pipe = _pipe(tiny_cfg)
    base = _gen(pipe)
    pipe.load_lora_weights(res["lora"], adapter_name="peft")
    with_peft = _gen(pipe)
    pipe.unload_lora_weights()
    load_lora(pipe, res["kohya"], "kohya")
    with_kohya = _gen(pipe)
    pipe.unload_lora_weights()
    assert np.abs(with_peft - base).mean() > 1e-3  # the LoRA changes the output
    np.testing.assert_allclose(with_kohya, with_peft, atol=1e-4)  # the two layouts are the same LoRA (alpha 8, scale 2)
    cat_path = register(tmp_path / "catalog.yaml", catalog, [{**res, "slug": "duo_r4", "name": "duotone r4"}],
                        tiny_cfg["lora_dir"])
    from lorafind_utils.core.config import load_catalog

    cat = load_catalog({**tiny_cfg, "catalog": str(cat_path)})
    assert cat[-1]["slug"] == "duo_r4" and len(cat) == len(catalog) + 1
    assert open(cat[-1]["path"], "rb").read() == open(res["kohya"], "rb").read()  # copied into lora_dir
    # stage 01 can use the registered catalog: the seeded stand-ins stay as they are, the trained LoRA is a file
    from lorafind_utils.models.pipelines import prepare_loras

    before = {e["slug"]: open(e["path"], "rb").read() for e in catalog}
    ready = prepare_loras({**tiny_cfg, "catalog": str(cat_path)})
    assert [e["slug"] for e in ready][-1] == "duo_r4"
    assert all(open(e["path"], "rb").read() == before[e["slug"]] for e in ready[:-1])


def test_resumed_training_equals_an_uninterrupted_run(tiny_cfg, catalog, style_set, tmp_path):
    from safetensors.torch import load_file

    train, _ = split_style_set(style_set, 0.25, 0)
    kw = dict(rank=2, steps=6, lr=1e-3, batch_size=2, checkpoint_every=3, progress=False, seed=4)
    full = train_lora(tiny_cfg["models"]["base"], train, tmp_path / "full", **kw)
    part = train_lora(tiny_cfg["models"]["base"], train, tmp_path / "resumed", stop_after=3, **kw)
    assert part["stopped_at"] == 3 and not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    resumed = train_lora(tiny_cfg["models"]["base"], train, tmp_path / "resumed", **kw)
    assert resumed["history"] == full["history"]
    # a finished run called again trains nothing and reports the speed of the steps it made, not of the reload
    again = train_lora(tiny_cfg["models"]["base"], train, tmp_path / "full", **kw)
    assert again["train_seconds"] == full["train_seconds"] > 0 and again["steps_per_s"] == full["steps_per_s"]
    a, b = load_file(full["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="belongs to another run"):
        train_lora(tiny_cfg["models"]["base"], train, tmp_path / "resumed", **{**kw, "rank": 8})


def test_min_snr_weights_match_the_hand_computed_schedule():
    from diffusers import DDPMScheduler

    from lorafind_utils.models.lora_training import min_snr_weights

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD1.5's scaled-linear schedule
    abar = np.cumprod(1 - betas)
    snr = abar / (1 - abar)
    t = torch.tensor([0, 100, 250, 500, 999])
    eps = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    w = min_snr_weights(eps, t, 5.0).double().numpy()
    np.testing.assert_allclose(w, np.minimum(snr[t], 5.0) / snr[t], rtol=1e-4)
    assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)  # nearly-clean steps weigh little, noisy ones fully
    v = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    np.testing.assert_allclose(
        min_snr_weights(v, t, 5.0).double().numpy(), np.minimum(snr[t], 5.0) / (snr[t] + 1), rtol=1e-4
    )


def test_timestep_window_and_snr_gamma_are_checked_and_part_of_the_run(tiny_cfg, catalog, style_set, tmp_path):
    train, _ = split_style_set(style_set, 0.25, 0)
    kw = dict(rank=2, steps=4, lr=1e-3, batch_size=2, checkpoint_every=2, progress=False, seed=4)
    base = tiny_cfg["models"]["base"]
    for bad, msg in (({"min_timestep": 700, "max_timestep": 700}, "min_timestep"), ({"snr_gamma": 0}, "snr_gamma")):
        with pytest.raises(ValueError, match=msg):
            train_lora(base, train, tmp_path / "bad", **kw, **bad)
    plain = train_lora(base, train, tmp_path / "plain", **kw)
    weighted = train_lora(base, train, tmp_path / "w", **kw, snr_gamma=5.0, min_timestep=500)
    # same seed, same draws: the window moves the timesteps and the weights change every loss
    assert all(a["loss"] != b["loss"] for a, b in zip(plain["history"], weighted["history"]))
    train_lora(base, train, tmp_path / "w2", stop_after=2, **kw, snr_gamma=5.0)
    with pytest.raises(ValueError, match="belongs to another run .*snr_gamma"):
        train_lora(base, train, tmp_path / "w2", **kw, snr_gamma=1.0)


# --- metrics on cases with known answers (small injected networks, as offline tests must) -----


class TinyFeatures(torch.nn.Module):
    """Per-channel mean and sd of the image: a small feature network for torchmetrics' hook."""

    num_features = 6

    def forward(self, x):
        x = x.double() / 255.0
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


class TinyLogits(torch.nn.Module):
    num_features = 3

    def __init__(self, fixed=None):
        super().__init__()
        self.fixed = fixed

    def forward(self, x):
        x = x.double() / 255.0
        if self.fixed is not None:
            return torch.tensor(self.fixed, dtype=torch.float64).repeat(len(x), 1)
        return 20 * x.mean((2, 3))


def _imgs(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 16, 16), generator=g)
    return (x + shift).clamp(0, 255).to(torch.uint8)


def test_fid_and_kid_are_zero_for_identical_sets_and_grow_with_a_shift():
    from lorafind_utils.models.style_metrics import fid_kid

    a = _imgs(12, 0)
    same = fid_kid(a, a, TinyFeatures(), subset_size=6)
    other = _imgs(12, 5)
    assert fid_kid(a, other, TinyFeatures(), 6)["kid"] == fid_kid(a, other, TinyFeatures(), 6)["kid"]  # seeded subsets
    assert abs(same["fid"]) < 1e-6 and abs(same["kid"]) < 0.05 * fid_kid(a, _imgs(12, 0, 40), TinyFeatures(), 6)["kid"]
    small, big = fid_kid(a, _imgs(12, 0, 20), TinyFeatures(), 6), fid_kid(a, _imgs(12, 0, 60), TinyFeatures(), 6)
    assert 0 < small["fid"] < big["fid"] and 0 < small["kid"] < big["kid"]
    # a pure mean shift of d/255 in every channel: FID's mean term is 3 (d/255)^2 (covariances unchanged,
    # except where clamping at 255 cuts the shift)
    d = 10
    shifted = fid_kid(a, (a.int() + d).to(torch.uint8), TinyFeatures(), 6)["fid"]
    assert shifted == pytest.approx(3 * (d / 255) ** 2, rel=1e-3)


def test_one_real_set_scored_against_many_sets_equals_fresh_metrics():
    """FidKid keeps the real set's features across calls: each call equals a fresh fid_kid."""
    from lorafind_utils.models.style_metrics import FidKid, fid_kid

    a = _imgs(12, 0)
    fk = FidKid(a, TinyFeatures(), subset_size=6)
    fakes = [_imgs(12, 3, 30), _imgs(12, 0), _imgs(8, 7, 60)]
    got = [fk(f) for f in fakes]
    assert got == [fid_kid(a, f, TinyFeatures(), 6) for f in fakes]
    assert got[1]["fid"] < got[0]["fid"] < got[2]["fid"]  # not a stale generated set


def test_inception_score_known_cases():
    from lorafind_utils.models.style_metrics import inception_score

    # every image gets the same prediction: p(y|x) = p(y), KL = 0, IS = 1
    assert inception_score(_imgs(8, 1), TinyLogits(fixed=[1.0, 2.0, 3.0]))["is"] == pytest.approx(1.0)
    # confident, evenly spread predictions over 3 classes: IS = 3
    x = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    for i in range(6):
        x[i, i % 3] = 255
    assert inception_score(x, TinyLogits())["is"] == pytest.approx(3.0, rel=1e-3)


def test_lpips_is_zero_for_identical_images_and_grows_with_distortion():
    from lorafind_utils.models.style_metrics import lpips_model, lpips_to_set

    m = lpips_model("random")
    a = _imgs(1, 2).repeat(1, 1, 4, 4)  # 64 px: LPIPS' AlexNet needs some size
    torch.rand(5)  # the random backbone is seeded: the global RNG state does not matter
    b = (a.int() + 30).clamp(0, 255).to(torch.uint8)
    assert lpips_to_set(b, a, lpips_model("random")) == lpips_to_set(b, a, m)
    assert lpips_to_set(a, a, m) == pytest.approx(0.0, abs=1e-6)
    assert (
        0
        < lpips_to_set((a.int() + 30).clamp(0, 255).to(torch.uint8), a, m)
        < lpips_to_set(_imgs(1, 9).repeat(1, 1, 4, 4), a, m)
    )


def test_clip_score_formula_against_hand_computed_embeddings():
    from lorafind_utils.models.style_metrics import clip_score

    class FakeClip:
        def get_image_features(self, pixel_values):
            return torch.tensor([[1.0, 0.0], [1.0, 1.0]])

        def get_text_features(self, input_ids, attention_mask=None):
            return torch.tensor([[1.0, 0.0], [-1.0, 0.0]])

    def proc(text, images, **kw):
        return {
            "pixel_values": torch.zeros(len(images), 3, 2, 2),
            "input_ids": torch.zeros(len(text), 3, dtype=torch.long),
        }

    # cos = 1 and cos = -1/sqrt(2) (clamped to 0): mean of 100 and 0
    assert clip_score(_imgs(2, 3), ["a", "b"], FakeClip(), proc) == pytest.approx(50.0)


def test_bridge_start_is_img2img_starting_point_and_x0_weights_are_one_there():
    from diffusers import DDPMScheduler

    from lorafind_utils.models.lora_training import bridge_targets, x0_weights

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    zp, zy, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ts = 500
    abar = sched.alphas_cumprod
    zt, eps_eff = bridge_targets(sched, zp, zy, eps, torch.tensor([ts] * 3), ts)
    # at the start step the bridge's noisy latent is exactly what img2img starts from: the PHOTO noised
    torch.testing.assert_close(zt, abar[ts].sqrt() * zp + (1 - abar[ts]).sqrt() * eps, rtol=1e-5, atol=1e-5)
    # and its target, followed to t = 0 (x0 = (z_t - sqrt(1 - abar) eps_eff) / sqrt(abar)), is the STYLE latent
    torch.testing.assert_close((zt - (1 - abar[ts]).sqrt() * eps_eff) / abar[ts].sqrt(), zy, rtol=1e-4, atol=1e-4)
    w = x0_weights(sched, torch.tensor([0, 250, ts]), ts)
    assert w[-1] == pytest.approx(1.0) and w[0] < w[1] < w[2]


def test_bridge_objective_needs_pairs_trains_resumes_and_is_part_of_the_run(tiny_cfg, catalog, style_set, tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file

    train, _ = split_style_set(style_set, 0.25, 0)
    base = tiny_cfg["models"]["base"]
    kw = dict(rank=2, steps=4, lr=1e-3, batch_size=2, checkpoint_every=2, progress=False, seed=4, objective="bridge",
              strength=0.5, infer_steps=10, controlnet=tiny_cfg["models"]["controlnet"])
    with pytest.raises(StyleDataError, match="pairs; .* has no source photo"):
        train_lora(base, train, tmp_path / "unpaired", **kw)
    with pytest.raises(ValueError, match="unknown LoRA objective 'brige'"):
        train_lora(base, train, tmp_path / "typo", **{**kw, "objective": "brige"})
    pairs = [replace(it, source=it.image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)) for it in train]
    full = train_lora(base, pairs, tmp_path / "full", **kw)
    assert full["objective"] == "bridge" and 0 < full["t_start"] < 1000 and len(full["history"]) == 4
    assert all(np.isfinite(h["loss"]) for h in full["history"])
    train_lora(base, pairs, tmp_path / "resumed", stop_after=2, **kw)
    resumed = train_lora(base, pairs, tmp_path / "resumed", **kw)
    assert resumed["history"] == full["history"]
    a, b = load_file(full["lora"]), load_file(resumed["lora"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    standard = train_lora(base, train, tmp_path / "standard", **{k: v for k, v in kw.items()
                                                                   if k not in ("objective", "controlnet")})
    assert standard["objective"] == "standard" and standard["history"] != full["history"]
    train_lora(base, pairs, tmp_path / "s", stop_after=2, **kw)
    with pytest.raises(ValueError, match="belongs to another run .*strength"):
        train_lora(base, pairs, tmp_path / "s", **{**kw, "strength": 0.7})
