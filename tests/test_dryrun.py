"""The paper profile's dry run (``lorafind_utils.dryrun``): its pieces at full size where they cost
no memory (meta-device key sets, FLOP counts), and the whole paper code path at tiny size.

``test_paper_path_at_tiny_size`` runs stages 01-07 of the *paper* profile in-process through the
dry run's own preparation -- the SD1.5 snapshot layout with the hub's scheduler file, kohya LoRA /
LoCon / UNet-only files, a ResNet50 through ``weights: <path>``, the stage-05 thumbnails folder,
the paper's metric networks from a planted torch.hub cache -- with SD1.5-shaped models small
enough for seconds, so that what the full-size dry run found breaks here first.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lorafind_utils import dryrun as D
from lorafind_utils.dryrun import cost, fixtures
from lorafind_utils.models import hub_configs as C
from lorafind_utils.models.loras import check_lora_against_model, inspect_lora

TINY_UNET = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    layers_per_block=1,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_CONFIGS = fixtures.ModelConfigs(
    unet=TINY_UNET,
    vae=dict(C.SD15_VAE_CONFIG, block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64),
    # SD1.5's legacy bos/eos/pad ids 0/2/1 are kept: the pooled output then takes the argmax token
    text_encoder=dict(
        C.SD15_TEXT_ENCODER_CONFIG,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
    ),
    controlnet=dict(
        C.SD15_CONTROLNET_CANNY_CONFIG,
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=TINY_UNET["down_block_types"],
        cross_attention_dim=32,
    ),
    clip={
        "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": dict(
            C.CLIP_VIT_L14_TEXT_CONFIG,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=16,
        ),
        "vision_config": dict(
            C.CLIP_VIT_L14_VISION_CONFIG,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        ),
    },
    clip_processor=dict(
        C.CLIP_VIT_L14_PROCESSOR_CONFIG, crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}
    ),
)
#: the paper profile at 64 px (its other settings as the dry run leaves them)
TINY_EXTRA = {"stages": {"01_synthesize": {"resolution": 64}, "02_finetune": {"image_size": 64},
                         "07_train_style_lora": {"resolution": 64}}}


# ---------------------------------------------------------------------------------------------
# full size, no memory: configs, key sets, FLOPs, overrides
# ---------------------------------------------------------------------------------------------


def test_snapshot_configs_have_published_parameter_counts():
    assert C.n_params(C.meta_sd15_vae()) == C.SD15_VAE_PARAMS
    assert C.n_params(C.meta_clip_vit_l14()) == C.CLIP_VIT_L14_PARAMS
    assert C.n_params(C.meta_sd15_controlnet()) == C.SD15_CONTROLNET_PARAMS


def test_full_size_stand_in_loras_have_the_real_key_sets(tmp_path):
    unet, te = fixtures.meta_models()
    made = {}
    for spec in fixtures.LORAS:
        path = tmp_path / f"{spec.slug}.safetensors"
        made[spec.slug] = fixtures.make_lora_file(spec, path, unet, te)
        info = inspect_lora(path)
        touched = check_lora_against_model(info, unet, te)
        made[spec.slug].update(layout=info.layout, touched=touched, rank=info.rank, modules_in_file=len(info.modules))
    # kohya's numbers for SD1.5: 192 UNet + 72 text-encoder modules; LoCon adds 86 resnet/sampler modules
    assert made["anime"]["layout"] == "kohya" and made["anime"]["touched"] == {"unet": 192, "text_encoder": 72}
    assert made["disco"]["layout"] == "kohya-locon" and made["disco"]["touched"] == {"unet": 278, "text_encoder": 72}
    assert made["chinese_ink"]["touched"] == {"unet": 192, "text_encoder": 0}
    assert made["anime"]["bytes"] == pytest.approx(37.9e6, rel=0.01)  # a rank-32 fp16 SD1.5 LoRA, as on Civitai
    info = inspect_lora(tmp_path / "disco.safetensors")
    assert info.modules["lora_unet_mid_block_resnets_1_conv2"]["down"] == (8, 1280, 3, 3)  # conv rank
    assert info.modules["lora_unet_mid_block_attentions_0_proj_in"]["down"] == (32, 1280, 1, 1)


def test_flop_counts_match_the_known_architectures():
    f = cost.measure_flops()
    T = 1e12
    assert f["unet_step"] / T == pytest.approx(0.803, rel=0.01)  # ~0.40 TMACs per 64x64-latent step
    assert f["controlnet_step"] / T == pytest.approx(0.283, rel=0.01)
    assert f["vae_decode"] / T == pytest.approx(2.51, rel=0.01)
    assert f["resnet_eval_image"] / 1e9 == pytest.approx(8.2, rel=0.02)  # ResNet50: 4.1 GMACs at 224 px
    # backward through layer3 + layer4 + head only (the paper's trainable part): ~2x, not 3x, the forward
    assert 1.8 < f["resnet_train_image"] / f["resnet_eval_image"] < 2.3
    assert 2.0 < f["lora_train_step"] / f["unet_step_plain"] < 2.3
    per = cost.per_image_flops(f, 20, 0.8)
    assert per == f["text_encoder"] + f["vae_encode"] + 16 * (f["unet_step"] + f["controlnet_step"]) + f["vae_decode"]
    work = cost.paper_workload(f)
    est = cost.gpu_estimate(f, work, "A100 40GB", 0.35)
    assert work["total"] == sum(s["flops"] for s in work["stages"].values())
    assert 0.5 < est["implied_img_per_s"] < 1.5  # the published 0.7-1.1 images/s is in reach at 35 %
    assert est["total_h"] == pytest.approx(work["total"] / (312e12 * 0.35) / 3600)


def test_overrides_keep_the_paper_settings_and_cut_counts(tmp_path):
    from lorafind_utils.core.config import load_profile

    paths = fixtures.dryrun_paths(tmp_path)
    cfg = load_profile("paper", D.overrides(paths, fixtures.DEFAULT))
    s = cfg["stages"]
    assert cfg["name"] == "paper" and cfg["models"]["kind"] == "hub" and cfg["device"] == "cpu"
    assert s["01_synthesize"]["resolution"] == 512 and s["01_synthesize"]["strength"] == 0.8
    assert s["02_finetune"]["backbone"] == "resnet50" and s["02_finetune"]["image_size"] == 224
    assert s["02_finetune"]["weights"] == str(paths.resnet)
    assert s["05_retrieve_thumbnails"]["make_queries"] is False
    assert s["07_train_style_lora"]["resolution"] == 512 and s["07_train_style_lora"]["ranks"] == [4]
    dev = "\n".join(D.deviations(D.overrides(paths, fixtures.DEFAULT)))
    for untouched in ("resolution", "image_size", "backbone", "strength", "guidance_scale", "lr"):
        assert f".{untouched}:" not in dev
    with pytest.raises(ValueError, match="sizes"):
        fixtures.Counts(images=4, sizes=(4,)).check()


def test_stage_disk_follows_the_runner_log(tmp_path, monkeypatch):
    """The per-stage disk numbers hang on the runner's log lines: run_study's real messages must match."""
    import papermill

    from lorafind_utils.engines import runner

    nb_dir = tmp_path / "nbs"
    nb_dir.mkdir()
    (nb_dir / "01_synthesize.ipynb").write_text("{}")

    def fake_execute(src, out, **kw):
        (tmp_path / "root" / "out.bin").write_bytes(b"x" * 4096)

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    (tmp_path / "root").mkdir()
    disk = D.StageDisk(tmp_path / "root", (), log=lambda m: None)
    runner.run_study("tiny", overrides={"runs_dir": str(tmp_path / "runs")}, notebooks_dir=nb_dir,
                     output_dir=tmp_path / "pm", log=disk)
    assert disk.written == {"01_synthesize": 4096}


# ---------------------------------------------------------------------------------------------
# the paper code path at tiny size
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dryrun(tmp_path_factory):
    root = tmp_path_factory.mktemp("dryrun")
    paths = fixtures.dryrun_paths(root)
    fixtures.prepare_models(paths, configs=TINY_CONFIGS, log=lambda m: None)
    fixtures.prepare_loras(paths, fixtures.SMOKE, configs=TINY_CONFIGS)
    fixtures.prepare_images(paths, fixtures.SMOKE)
    return paths


def test_snapshot_layout_is_the_hub_one_and_loads_offline(tiny_dryrun):
    from lorafind_utils.core.config import load_profile
    from lorafind_utils.models.pipelines import load_pipeline

    base = tiny_dryrun.base
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"):
        assert (base / f).is_file(), f
    assert not (base / "safety_checker").exists()  # listed in model_index.json, not downloaded by `lorafind fetch`
    sched = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler" and sched["clip_sample"] is False  # the hub's file, as it is
    with D.environment(tiny_dryrun):
        cfg = load_profile("paper", D.overrides(tiny_dryrun, fixtures.SMOKE, extra=TINY_EXTRA))
        pipe = load_pipeline(cfg, "cpu")
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity is not installed")
def test_planted_hub_weights_serve_the_paper_metric_networks(tiny_dryrun):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from lorafind_utils.models import style_metrics as sm

    with D.environment(tiny_dryrun):
        FrechetInceptionDistance(feature=sm.feature_extractor("inception"))
        sm.lpips_model("imagenet")


@pytest.mark.slow
def test_paper_path_at_tiny_size(tiny_dryrun):
    """Stages 01-07 of the paper profile on the dry run's preparation, 64 px."""
    from lorafind_utils import stages
    from lorafind_utils.core import layout
    from lorafind_utils.core.config import load_profile

    with D.environment(tiny_dryrun):
        cfg = load_profile("paper", D.overrides(tiny_dryrun, fixtures.SMOKE, extra=TINY_EXTRA))
        out = {}
        for stage in stages.STAGES:
            out[stage] = stages.run(stage, cfg, progress=False, log=lambda m: None)
    assert len(out["01_synthesize"]["manifest"]["items"]) == 4 * 3 * 2
    assert out["02_finetune"]["metrics"]["backbone"].startswith("resnet50 (weights from ")
    assert len(out["05_retrieve_thumbnails"]["pairs"]) == 4 * fixtures.SMOKE.thumbnails
    assert out["07_train_style_lora"]["feature_net"] == cfg["stages"]["07_train_style_lora"]["feature_net"]
    assert layout.figure(cfg, "table2.md").exists() and layout.figure(cfg, "style_lora_ranks.md").exists()


def test_safetensors_header_length_ending_in_0x80_is_not_a_pickle(tmp_path):
    from safetensors.torch import save_file

    sd = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}
    path = tmp_path / "x.safetensors"
    for i in range(600):  # grow the metadata until the header length ends in 0x80
        save_file(sd, str(path), metadata={"pad": "_" * i})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80" and path.read_bytes()[8:9] == b"{"  # a valid safetensors file
    assert inspect_lora(path).layout == "kohya-locon"


def test_stage07_refuses_one_eval_prompt_before_training(tiny_dryrun):
    """Found by the dry run: with one prompt FID/KID failed only after every rank had trained."""
    from lorafind_utils.core import layout
    from lorafind_utils.core.config import load_profile, stage_params
    from lorafind_utils.stages.style_lora import run_sweep

    cfg = load_profile("paper", D.overrides(tiny_dryrun, fixtures.SMOKE, extra=TINY_EXTRA))
    p = dict(stage_params(cfg, "07_train_style_lora"), eval_prompts=["one prompt"], run_name="one_prompt")
    with pytest.raises(ValueError, match="eval_prompts"):
        run_sweep(cfg, p, progress=False)
    assert not layout.style_lora_dir(cfg, "one_prompt").exists()


# ---------------------------------------------------------------------------------------------
# bugs the dry run found elsewhere, each caught here at tiny size
# ---------------------------------------------------------------------------------------------


def test_paper_metric_networks_are_dependencies():
    import tomllib

    from lorafind_utils.core.config import load_profile, project_root

    deps = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]["dependencies"]
    assert load_profile("paper")["stages"]["07_train_style_lora"]["feature_net"] == "inception"
    assert any(d.replace("_", "-").lower().startswith("torch-fidelity") for d in deps)


@pytest.mark.parametrize("k", [2, 3])
def test_small_catalogs_get_every_run_metric(k):
    import numpy as np

    from lorafind_utils.core.metrics import RUN_METRICS, classification_metrics

    labels = np.arange(2 * k) % k
    scores = np.eye(k)[(labels + 1) % k] + 0.1
    m = classification_metrics(labels, scores, [f"c{i}" for i in range(k)])
    assert all(name in m for name in RUN_METRICS)
    assert m["top3_accuracy"] == 1.0  # every class is within the top 3 of 3 or fewer


def test_zero_denoising_steps_are_refused_before_anything_is_written(tiny_dryrun, tmp_path):
    from lorafind_utils.core import layout
    from lorafind_utils.core.config import load_profile, stage_params
    from lorafind_utils.stages.synthesis import synthesize

    cfg = load_profile("paper", D.overrides(tiny_dryrun, fixtures.SMOKE, extra=TINY_EXTRA))
    p = dict(stage_params(cfg, "01_synthesize"), steps=1, max_images=1)
    out = tmp_path / "synth"
    with pytest.raises(ValueError, match="steps"):
        synthesize(cfg, p, out_dir=out, progress=False)
    assert not layout.synth_params_file(out).exists()


def test_stage06_and_queries_refuse_zero_denoising_steps(tiny_dryrun):
    """Found by the dry run (steps 1 x strength 0.8): stages 05/06 name the two values before loading anything."""
    from lorafind_utils.core.config import load_profile, stage_params
    from lorafind_utils.models.pipelines import check_denoising_steps
    from lorafind_utils.stages.generation import figure8_rows
    from lorafind_utils.stages.retrieval import make_queries

    assert check_denoising_steps(20, 0.8) == 16
    cfg = load_profile("paper", D.overrides(tiny_dryrun, fixtures.SMOKE, extra=TINY_EXTRA))
    p01 = dict(stage_params(cfg, "01_synthesize"), steps=1)
    with pytest.raises(ValueError, match=r"stage 06.*steps 1 x strength 0.8"):
        figure8_rows(cfg, {"queries": []}, [], None, 0, p01, ranker=None, pipe="not loaded")
    qp = dict(p01, prompts=[], query_set="faces", images_per_lora=1, strength=0.6)
    with pytest.raises(ValueError, match="stage 05 img2img queries"):
        make_queries(cfg, qp, tiny_dryrun.root / "q", pipe="not loaded")
