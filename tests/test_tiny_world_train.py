"""The tiny world's training parts (scripts/tiny_world.py, scripts/train_tiny_world.py) at a few steps:
a part killed and resumed equals one run straight through, the base it ships loads through diffusers'
``from_pretrained`` and restyles, and bad settings are refused with a message."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tiny_world as tw
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CODEC = {"batch_size": 4, "styled_share": 0.0}
DENOISER = {"batch_size": 4, "aug": 1}
CONTROLNET = {"batch_size": 4, "aug": 1}


def _use(monkeypatch, root: Path) -> None:
    world = root / "world"
    monkeypatch.setattr(tw, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(tw, "RUN_DIR", root / "train")
    monkeypatch.setattr(tw, "WORLD_DIR", world)
    monkeypatch.setattr(tw, "SD15_DIR", world / "sd15")
    monkeypatch.setattr(tw, "CONTROLNET_DIR", world / "controlnet-canny")
    monkeypatch.setattr(tw, "LORA_DIR", world / "loras")


def _tokenizer(root: Path) -> None:
    tw.build_tokenizer(root / "train" / "tokenizer")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """codec (4 steps) -> denoiser (3 steps) -> ControlNet (2 steps), each straight through."""
    root = tmp_path_factory.mktemp("world")
    mp = pytest.MonkeyPatch()
    _use(mp, root)
    torch.set_num_threads(2)
    _tokenizer(root)
    codec = tw.train_codec(0, steps=4, progress=False, settings=CODEC)
    den = tw.train_denoiser(0, steps=3, progress=False, settings=DENOISER)
    cn = tw.train_controlnet(0, steps=2, progress=False, settings=CONTROLNET)
    yield root, codec, den, cn
    mp.undo()


def test_parts_finish_and_record_their_settings(trained):
    root, codec, den, cn = trained
    assert codec["steps"] == 4 and codec["settings"]["batch_size"] == 4 and codec["settings"]["styled_share"] == 0.0
    assert den["steps"] == 3 and den["settings"]["aug"] == 1 and cn["steps"] == 2
    assert 0 < codec["val_psnr"] < 40 and np.isfinite(den["loss_last200"])
    assert (root / "world" / "sd15" / "model_index.json").exists()
    assert (root / "world" / "controlnet-canny" / "config.json").exists()


def test_killed_codec_resumes_to_the_same_weights(trained, tmp_path, monkeypatch):
    root, codec, _, _ = trained
    _use(monkeypatch, tmp_path)
    part = tw.train_codec(0, steps=4, progress=False, stop_after=3, settings=CODEC)  # killed after step 3
    assert part["steps"] == 3 and not (tmp_path / "train" / "codec" / "final").exists()
    ck = tmp_path / "train" / "codec" / "checkpoint" / "state.json"
    assert json.loads(ck.read_text())["step"] == 2  # the rerun starts from step 2
    tw.train_codec(0, steps=4, progress=False, settings=CODEC)
    a = load_file(str(root / "train" / "codec" / "final" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "train" / "codec" / "final" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_setting_refuses_the_old_checkpoint(trained, tmp_path, monkeypatch):
    _use(monkeypatch, tmp_path)
    tw.train_codec(0, steps=4, progress=False, stop_after=2, settings=CODEC)
    with pytest.raises(ValueError, match="belongs to another run .*batch_size"):
        tw.train_codec(0, steps=4, progress=False, settings={**CODEC, "batch_size": 2})


def test_shipped_base_loads_and_controlnet_steers(trained):
    root, *_ = trained
    pipe = tw.load_world_pipeline(root / "world")
    ids, ims = tw.heldout_images(2)
    a = tw.restyle(pipe, ims, [1, 2], strength=0.7, steps=2)
    b = tw.restyle(pipe, ims, [1, 2], strength=0.7, steps=2, controlnet_scale=0.0)
    assert [x.size for x in a] == [(tw.RESOLUTION, tw.RESOLUTION)] * 2
    # from_unet's zero convs: an untrained ControlNet adds nothing; two steps of training make it add something
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown setting 'batchsize'; known: .*batch_size"):
        tw._settings(tw.CODEC, {"batchsize": 8}, None)
    p = tw._settings(tw.DENOISER, {"batch_size": "256", "lr": "5e-4"}, 10)
    assert p["batch_size"] == 256 and p["lr"] == 5e-4 and p["steps"] == 10
    assert tw._settings(tw.DENOISER, {"steps": "4e4"}, None)["steps"] == 40000
    with pytest.raises(ValueError, match="'batch_size': expected a whole number, got '1.5'"):
        tw._settings(tw.CODEC, {"batch_size": "1.5"}, None)
    with pytest.raises(ValueError, match="'locon': expected one of .*, got 'flase'"):
        tw._settings(tw.LORA, {"locon": "flase"}, None)
    with pytest.raises(ValueError, match="'lr': expected a number, got 'fast'"):
        tw._settings(tw.CODEC, {"lr": "fast"}, None)


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny_world", REPO / "scripts" / "train_tiny_world.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_parses_overrides():
    mod = _script()
    o = mod.parse_overrides(["denoiser.steps=40000", "codec.batch_size=64", "loras.rank=16", "loras.locon=false"])
    assert o["denoiser"] == {"steps": "40000"} and o["codec"] == {"batch_size": "64"}
    lora = tw._settings(tw.LORA, o["loras"], None)  # what train_loras makes of them
    assert (lora["rank"], lora["locon"]) == (16, False) and type(lora["rank"]) is int
    for bad in (["steps=3"], ["preview.steps=3"], ["denoiser.steps"], ["loras.rnak=4"]):
        with pytest.raises(ValueError):
            mod.parse_overrides(bad)
    with pytest.raises(SystemExit):
        mod.main(["--set", "nonsense"])


def test_loras_train_on_the_world_and_the_retrieval_probe_scores_them(trained):
    root, *_ = trained
    res = tw.train_loras(0, slugs=["xiaorensu", "liuli"], progress=False, settings={"steps": 2, "batch_size": 2})
    assert set(res) == {"xiaorensu", "liuli"} and res["liuli"]["snr_gamma"] == tw.LORA["snr_gamma"] == 1.0
    files = {s: root / "world" / "loras" / f"{s}.safetensors" for s in res}
    from lorafind_utils.models.loras import inspect_lora

    assert all(inspect_lora(f).layout == "kohya-locon" for f in files.values())  # LoCon: conv keys too
    pipe = tw.load_world_pipeline(root / "world")
    probe = tw.retrieval_probe(pipe, files, strength=0.7, n_train=4)
    assert probe["chance"] == {"top1": 0.5, "top3": 1.0, "mrr": 0.75}
    for part, n in (("style_samples", 2 * len(tw.pool("queries"))), ("own_generations", 2 * len(tw.split_base()[1]))):
        m = probe[part]
        assert (
            m["n"] == n
            and m["top3"] == 1.0
            and 0.5 <= m["mrr"] <= 1.0
            and m["mrr"] == pytest.approx(0.5 + m["top1"] / 2)
        )
        assert set(m["per_style"]) == set(files)
