"""Stage 01: per-item seeds, skipped guidance, batching, resume, bad inputs."""
import json
import shutil

import numpy as np
import pytest
from conftest import tiny_overrides

from lorafind_utils.core.config import load_profile, resolve
from lorafind_utils.core.images import read_base_set
from lorafind_utils.models.loras import LoraError
from lorafind_utils.models.restyle import item_seed, prepare_base_images, restyle
from lorafind_utils.stages.synthesis import synthesize


@pytest.fixture(scope="module")
def prepared(tiny_cfg, stage_params):
    imgs = read_base_set(resolve(tiny_cfg["base_images"]["variety"]))[:3]
    ok, _ = prepare_base_images(imgs, stage_params["resolution"], 100, 200)
    return ok


def test_item_seed_depends_on_every_part():
    s = item_seed(0, "anime", "001_dog")
    assert s == item_seed(0, "anime", "001_dog")
    assert (
        len({s, item_seed(1, "anime", "001_dog"), item_seed(0, "disco", "001_dog"), item_seed(0, "anime", "002_cat")})
        == 4
    )


def test_skipping_guidance_with_empty_prompt_equals_guided(tiny_pipe, prepared, stage_params):
    import torch

    kw = dict(prompt="", image=prepared[0].init, control_image=prepared[0].control, strength=0.5,
              num_inference_steps=6, controlnet_conditioning_scale=1.0, output_type="np")
    guided = tiny_pipe(guidance_scale=7.5, generator=torch.Generator().manual_seed(3), **kw).images[0]
    plain = tiny_pipe(guidance_scale=1.0, generator=torch.Generator().manual_seed(3), **kw).images[0]
    np.testing.assert_allclose(
        guided, plain, atol=1e-3
    )  # batch of 2 vs 1: another CPU may pick another kernel per batch size


def test_batch_size_does_not_change_images(tiny_pipe, prepared, stage_params):
    seeds = [11, 12, 13]
    together = restyle(tiny_pipe, prepared, seeds, stage_params)
    alone = [restyle(tiny_pipe, [p], [s], stage_params)[0] for p, s in zip(prepared, seeds)]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def _cfg(tiny_root, runs):
    return load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(runs)})


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.png"))}


class Boom(RuntimeError):
    pass


def test_killed_run_resumes_to_the_same_result(tiny_root, tiny_pipe, stage_params, tmp_path, monkeypatch):
    p = dict(stage_params, sets=["variety"], max_images=3)
    full = synthesize(_cfg(tiny_root, tmp_path / "a"), p, tmp_path / "a" / "synth", pipe=tiny_pipe, progress=False)
    assert len(full["items"]) == 12 * 3
    ref = _files(tmp_path / "a" / "synth")
    assert len(ref) == 36

    import lorafind_utils.models.restyle as syn  # where stage 01's batches call restyle

    real, calls = syn.restyle, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Boom("killed")
        return real(*a, **k)

    monkeypatch.setattr(syn, "restyle", dying)
    cfg_b = _cfg(tiny_root, tmp_path / "b")
    with pytest.raises(Boom):
        synthesize(cfg_b, p, tmp_path / "b" / "synth", pipe=tiny_pipe, progress=False)
    part = _files(tmp_path / "b" / "synth")
    assert 0 < len(part) < 36 and not (tmp_path / "b" / "synth" / "manifest.json").exists()
    monkeypatch.setattr(syn, "restyle", real)
    resumed = synthesize(cfg_b, p, tmp_path / "b" / "synth", pipe=tiny_pipe, progress=False)
    assert _files(tmp_path / "b" / "synth") == ref
    assert resumed == full
    assert json.loads((tmp_path / "b" / "synth" / "manifest.json").read_text()) == json.loads(
        (tmp_path / "a" / "synth" / "manifest.json").read_text())
    # a rerun does nothing and changes nothing
    calls["n"] = 0
    monkeypatch.setattr(syn, "restyle", dying)
    synthesize(cfg_b, p, tmp_path / "b" / "synth", pipe=tiny_pipe, progress=False)
    assert calls["n"] == 0
    # other parameters into the same folder: refused, not mixed
    with pytest.raises(ValueError, match="other parameters.*steps"):
        synthesize(cfg_b, dict(p, steps=3), tmp_path / "b" / "synth", pipe=tiny_pipe, progress=False)


def test_worker_processes_make_the_same_files_as_one_process(tiny_root, tiny_pipe, stage_params, tmp_path):
    """Two spawned workers (one LoRA per job, one thread each) = the in-process loop, byte for byte."""
    p = dict(stage_params, sets=["variety", "faces"], max_images=2)
    one = synthesize(_cfg(tiny_root, tmp_path / "a"), p, tmp_path / "a" / "synth", pipe=tiny_pipe, progress=False)
    two = synthesize(_cfg(tiny_root, tmp_path / "b"), p, tmp_path / "b" / "synth", progress=False, workers=2)
    assert one == two
    ref = _files(tmp_path / "a" / "synth")
    assert len(ref) == 12 * 2 * 2 and _files(tmp_path / "b" / "synth") == ref


def test_unreadable_base_image_is_recorded_not_silently_dropped(tiny_root, tiny_pipe, stage_params, tmp_path):
    src = resolve(load_profile("standin")["base_images"]["variety"])
    imgs = read_base_set(src)[:2]
    d = tmp_path / "base"
    d.mkdir()
    rows = ["file,subject,category,source,license"]
    for b in imgs:
        shutil.copy(b.path, d / b.path.name)
        rows.append(f"{b.path.name},x,objects,test,CC0")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.append("broken.jpg,x,objects,test,CC0")
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = load_profile(
        "standin", {**tiny_overrides(tiny_root), "runs_dir": str(tmp_path / "r"), "base_images": {"variety": str(d)}}
    )
    man = synthesize(
        cfg,
        dict(stage_params, sets=["variety"], max_images=0),
        tmp_path / "r" / "synth",
        pipe=tiny_pipe,
        progress=False,
    )
    assert [s["image"] for s in man["skipped"]] == ["broken"]
    assert "not a readable image" in man["skipped"][0]["reason"]
    assert len(man["items"]) == 12 * 2


def test_bad_lora_fails_before_any_image(tiny_root, tiny_pipe, stage_params, tmp_path):

    from lorafind_utils.models.pipelines import prepare_loras

    loras = tmp_path / "loras"
    cfg = load_profile(
        "standin", {**tiny_overrides(tiny_root), "lora_dir": str(loras), "runs_dir": str(tmp_path / "r")}
    )
    prepare_loras(cfg)
    (loras / "pop_art.safetensors").write_bytes(b"\x80\x04 pickle bytes")
    with pytest.raises(LoraError, match="pop_art.safetensors.*pickle"):
        synthesize(
            cfg,
            dict(stage_params, sets=["variety"], max_images=2),
            tmp_path / "r" / "synth",
            pipe=tiny_pipe,
            progress=False,
        )
    assert not list((tmp_path / "r").rglob("*.png"))
