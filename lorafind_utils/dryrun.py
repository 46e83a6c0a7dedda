"""Dry run of the ``paper`` profile on CPU: its code path and settings, with only the counts cut.

The paper profile needs a GPU box with model access. This module runs it here, offline, so that
a bug on its path (512 px, ResNet50 at 224 px with the paper's trainable layers, the paper's LoRA
layouts, full-size SD1.5 + ControlNet-Canny) is found before GPU time is spent:

* **Models** are the published architectures (:mod:`lorafind_utils.sd15_configs`) with seeded
  random weights, written with ``save_pretrained`` in the hub snapshot's layout
  (``models/stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer,scheduler,feature_extractor}``
  + ``model_index.json``; ``models/sd-controlnet-canny/``) and loaded by the very
  ``from_pretrained`` calls the paper profile makes (``models.base``/``controlnet`` point at the
  folders; ``models.kind`` stays ``hub``).
* **LoRAs**: full-size kohya files with random weights in the real key layout, named after
  entries of ``data/loras/paper.yaml``: a kohya LoRA with text-encoder keys, a kohya LoCon
  (3x3 conv keys, its own conv rank) and a UNet-only LoRA (fp16 tensors, as Civitai ships them).
* **ResNet50** with seeded random weights through stage 02's ``weights:`` path option.
* **Stage 05** reads "thumbnails" (stand-in photos in ``<runs_dir>/thumbnails/<slug>/``, with the
  manifest ``lorafind fetch`` writes): the paper's ``make_queries: false`` path.
* **Stage 07** keeps the paper's metric networks: the FID/KID/IS Inception (torch-fidelity) and
  LPIPS's ImageNet AlexNet load through ``torch.hub`` from a ``TORCH_HOME`` under the dry-run
  folder that holds seeded random weights under the real file names (a cached file is not
  re-verified); the CLIP score uses a seeded full-size ``openai/clip-vit-large-patch14`` folder.

Everything lies under one folder (``runs/dryrun/``, removable with ``make clean-dryrun``). The
study runs through :func:`lorafind_utils.runner.run_study` (papermill, notebooks 01-07), as on a
GPU box. ``report.json`` and ``report.md`` there hold, per stage, wall time, peak RSS (the
runner's records) and disk written; the FLOPs of one restyled 512-px image and of one ResNet50
training image (``torch.utils.flop_counter.FlopCounterMode``), and the resulting estimate of the
whole paper study on a named GPU.

``python -m lorafind_utils.dryrun [--keep-models] [--smoke]``
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import layout
from .config import merge, project_root
from .files import tree_bytes
from .runner import PeakRSS

#: the dry run's folder (everything it writes)
DRYRUN_DIR = "runs/dryrun"
#: bumped when the models written by :func:`prepare_models` change (their folder is rebuilt)
MODELS_VERSION = "1"

BASE_NAME, CONTROLNET_NAME = layout.DRYRUN_BASE_NAME, layout.DRYRUN_CONTROLNET_NAME
CLIP_NAME, RESNET_FILE = layout.DRYRUN_CLIP_NAME, layout.DRYRUN_RESNET_FILE
#: torch.hub file names the paper's metric networks load (torch-fidelity's Inception, torchvision's AlexNet)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


@dataclass(frozen=True)
class LoraSpec:
    """One stand-in LoRA: the catalog entry it is named after and its layout."""

    slug: str
    layout: str  # lora | locon
    rank: int
    alpha: float
    conv_rank: int = 0  # LoCon: rank of the 3x3 conv modules (kohya's conv_dim)
    conv_alpha: float = 0.0
    text_encoder: bool = True
    dtype: str = "float16"  # most Civitai files are fp16; some ship fp32


#: The stand-ins, in catalog order (the first ``Counts.loras`` are used).
LORAS = (
    LoraSpec("anime", "lora", rank=32, alpha=16.0),
    LoraSpec("disco", "locon", rank=32, alpha=16.0, conv_rank=8, conv_alpha=4.0),
    LoraSpec("chinese_ink", "lora", rank=64, alpha=32.0, text_encoder=False),
    LoraSpec("pixel_art", "lora", rank=8, alpha=8.0, dtype="float32"),
)


@dataclass(frozen=True)
class Counts:
    """What the dry run cuts down; every other setting is the paper profile's."""

    # 4 LoRAs: with 3 or fewer classes stage 03 fails (metrics has no top-3 accuracy; with 2, sklearn
    # refuses top-1 on binary labels) -- bugs of small catalogs, off the paper's 12-LoRA path (see the report)
    loras: int = 4  # LoRAs (classes)
    images: int = 3  # base images per set (variety, faces): 1 validates, 2 train
    steps: int = 2  # stage 01 denoising steps (x strength 0.8 = steps actually run)
    epochs: int = 1  # stages 02-04
    seeds: tuple = (0,)  # stages 03-04
    sizes: tuple = (1, 2)  # stage 03: training base images per class
    n_domain: int = 2  # stage 04: images per class
    thumbnails: int = 2  # stage 05: query images per LoRA
    queries: tuple = (0, 1)  # stage 06
    style_images: int = 6  # stage 07: demo style set (25 % held out, at least 2)
    ranks: tuple = (4,)
    lora_steps: int = 2
    lora_batch: int = 1  # stage 07 training batch (4 in the paper: ~4x the activation memory on CPU)
    eval_prompts: int = 2
    eval_seeds: tuple = (0,)
    infer_steps: int = 2
    index_epochs: int = 1  # stage 08: style-encoder epochs (seeds: ``seeds``)
    add_images: int = 2  # stage 08: base images `index add` restyles (at 512 px)
    open_set_images: int = 2
    folds: int = 2
    latency_queries: int = 3

    def check(self) -> "Counts":
        if not 4 <= self.loras <= len(LORAS):
            raise ValueError(f"loras must be 4..{len(LORAS)} (fewer classes break stage 03's top-3 accuracy)")
        n_train = self.images - math.ceil(0.2 * self.images)
        if self.images < 3 or max(self.sizes) > n_train or self.n_domain > min(n_train, self.images):
            raise ValueError(f"with {self.images} base images per set (at least 3: stage 08's encoder needs 2 to "
                             f"train), {n_train} train: sizes {self.sizes} and n_domain {self.n_domain} must not exceed that")
        if self.style_images < 4:
            raise ValueError("style_images must be >= 4 (2 held out, 2 to train)")
        if max(self.queries) >= self.loras * self.thumbnails:
            raise ValueError("stage 06 queries must index the stage 05 queries")
        return self


#: the default dry run (4 LoRAs x 3 base images x 2 sets, 2 steps, 1 epoch, one seed, one rank)
DEFAULT = Counts()
#: the smallest run that still passes every stage (for finding bugs quickly)
SMOKE = Counts(loras=4, images=3, steps=2, sizes=(1,), n_domain=1, thumbnails=1, queries=(0,), style_images=4,
               lora_steps=1, eval_prompts=2, infer_steps=1, add_images=1, open_set_images=1, latency_queries=2)


from .layout import DryRunPaths as Paths  # noqa: E402  (the folder's layout lives with every other path)


def dryrun_paths(root: str | Path | None = None) -> Paths:
    return layout.dryrun_paths(root or DRYRUN_DIR)


# ---------------------------------------------------------------------------------------------
# Models: published configs, seeded random weights, the hub snapshot's layout
# ---------------------------------------------------------------------------------------------


def _stamp(seed: int, configs: "ModelConfigs") -> str:
    from . import sd15_configs as C

    cfgs = [asdict(configs), C.SD15_SCHEDULER_CONFIG]
    h = hashlib.sha256(json.dumps(cfgs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return json.dumps({"version": MODELS_VERSION, "seed": seed, "configs": h, "torch_fidelity": _has_torch_fidelity()})


def _has_torch_fidelity() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_fidelity") is not None


@dataclass(frozen=True)
class ModelConfigs:
    """The architectures the dry run builds (default: the published ones; tests pass small ones
    through the same code)."""

    unet: dict
    vae: dict
    text_encoder: dict
    controlnet: dict
    clip: dict  # CLIPConfig kwargs: text_config, vision_config, projection_dim, logit_scale_init_value
    clip_processor: dict


def full_configs() -> ModelConfigs:
    from . import sd15_configs as C

    return ModelConfigs(C.SD15_UNET_CONFIG, C.SD15_VAE_CONFIG, C.SD15_TEXT_ENCODER_CONFIG,
                        C.SD15_CONTROLNET_CANNY_CONFIG, C.CLIP_VIT_L14_CONFIG, C.CLIP_VIT_L14_PROCESSOR_CONFIG)


def _clip_text_config(cfg: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


def meta_models(configs: ModelConfigs | None = None):
    """The UNet and text encoder of ``configs`` on the meta device (names and shapes, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    configs = configs or full_configs()
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(configs.unet)), CLIPTextModel(_clip_text_config(configs.text_encoder))


def save_sd15_base(folder: str | Path, seed: int = 0, configs: ModelConfigs | None = None) -> Path:
    """SD1.5 with seeded random weights in the layout of the hub snapshot ``lorafind fetch`` downloads
    (fp32 safetensors, no safety checker): one component at a time, so only one is in memory."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    import diffusers

    from . import sd15_configs as C

    configs = configs or full_configs()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs.unet)
    unet.save_pretrained(folder / "unet")
    del unet
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**configs.vae)
    vae.save_pretrained(folder / "vae")
    del vae
    torch.manual_seed(seed + 2)
    te = CLIPTextModel(_clip_text_config(configs.text_encoder))
    te.save_pretrained(folder / "text_encoder")
    del te
    write_hub_tokenizer(folder / "tokenizer")
    # the hub's file as it is (it carries keys PNDMScheduler no longer takes, e.g. clip_sample)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": C.SD15_SCHEDULER_CLASS, "_diffusers_version": "0.6.0", **C.SD15_SCHEDULER_CONFIG}, indent=2))
    PNDMScheduler.from_pretrained(folder, subfolder="scheduler")  # loads as the pipeline will
    CLIPImageProcessor(**C.SD15_FEATURE_EXTRACTOR_CONFIG).save_pretrained(folder / "feature_extractor")
    (folder / "model_index.json").write_text(json.dumps(
        {**C.SD15_MODEL_INDEX, "_diffusers_version": diffusers.__version__}, indent=2))
    return folder


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_hub_tokenizer(folder: str | Path) -> Path:
    """SD1.5's ``tokenizer/`` as the hub has it: ``vocab.json`` + ``merges.txt`` (the real CLIP BPE,
    from open_clip's wheel), ``tokenizer_config.json`` and ``special_tokens_map.json`` -- and no
    ``tokenizer.json``, so transformers must build the tokenizer from the BPE files, as it does
    from the real snapshot (``save_pretrained`` of transformers 5 would write only ``tokenizer.json``)."""
    from .tiny_models import build_clip_tokenizer

    folder = Path(folder)
    build_clip_tokenizer(folder)  # writes vocab.json + merges.txt
    bos, eos = _added("<|startoftext|>"), _added("<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": eos}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_prefix_space": False, "bos_token": bos, "do_lower_case": True, "eos_token": eos, "errors": "replace",
         "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
         "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer", "unk_token": eos},
        indent=2))
    return folder


def save_sd15_controlnet(folder: str | Path, seed: int = 0, configs: ModelConfigs | None = None,
                         zero_conv_std: float = 0.02) -> Path:
    """``lllyasviel/sd-controlnet-canny``'s architecture with seeded random weights. The "zero convs"
    get small seeded weights too (a trained ControlNet's are not zero; at zero the control image
    would have no effect at all)."""
    from diffusers import ControlNetModel

    configs = configs or full_configs()
    torch.manual_seed(seed + 3)
    cn = ControlNetModel(**configs.controlnet)
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for block in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * zero_conv_std)
    cn.save_pretrained(folder)
    return Path(folder)


def save_clip(folder: str | Path, seed: int = 0, configs: ModelConfigs | None = None) -> Path:
    """``openai/clip-vit-large-patch14`` (stage 07's CLIP score model) with seeded random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .tiny_models import build_clip_tokenizer

    configs = configs or full_configs()
    c = configs.clip
    folder = Path(folder)
    torch.manual_seed(seed + 5)
    model = CLIPModel(CLIPConfig(text_config=dict(c["text_config"]), vision_config=dict(c["vision_config"]),
                                 projection_dim=c["projection_dim"], logit_scale_init_value=c["logit_scale_init_value"]))
    model.save_pretrained(folder)
    del model
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(**configs.clip_processor),
                         tokenizer=build_clip_tokenizer(folder / "_tok_src"))
    proc.save_pretrained(folder)
    shutil.rmtree(folder / "_tok_src")
    return folder


def save_resnet50(path: str | Path, seed: int = 0) -> Path:
    """torchvision ResNet50 with seeded random weights, for stage 02's ``weights: <path>``."""
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    torch.manual_seed(seed + 6)
    sd = {k: v.contiguous() for k, v in resnet50(weights=None).state_dict().items()}
    save_file(sd, str(path))
    return Path(path)


def plant_torch_hub_weights(torch_home: str | Path, seed: int = 0) -> dict:
    """Seeded random weights under the torch.hub cache names of the paper's metric networks.

    ``torch.hub.load_state_dict_from_url`` takes a cached file as it is (its hash is checked only
    when it downloads), so with ``TORCH_HOME`` pointing here the paper's own calls -- torch-fidelity's
    FID/KID/IS Inception-v3 and LPIPS's ``torchvision.models.alexnet(pretrained=True)`` -- load these.
    """
    from torchvision.models import alexnet

    ck = Path(torch_home) / "hub" / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    out = {}
    torch.manual_seed(seed + 7)
    torch.save(alexnet(weights=None).state_dict(), ck / ALEXNET_FILE)
    out["alexnet"] = str(ck / ALEXNET_FILE)
    if _has_torch_fidelity():
        from unittest import mock

        import torch_fidelity.feature_extractor_inceptionv3 as fi

        torch.manual_seed(seed + 8)
        # build the network without its download, keep its constructor's (seeded) init
        with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None), \
                mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
            net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, ck / INCEPTION_FILE)
        out["inception"] = str(ck / INCEPTION_FILE)
    return out


def prepare_models(paths: Paths, seed: int = 0, reuse: bool = True, log=print, configs: ModelConfigs | None = None) -> dict:
    """Every model of the dry run under ``paths.models`` (reused when built with the same stamp).

    :return: {"reused": bool, "seconds": {part: s}}
    """
    stamp_file = paths.models / "stamp.json"
    configs = configs or full_configs()
    stamp = _stamp(seed, configs)
    if reuse and stamp_file.exists() and stamp_file.read_text() == stamp:
        log(f"models: reusing {paths.models}")
        return {"reused": True, "seconds": {}}
    if paths.models.exists():
        shutil.rmtree(paths.models)
    paths.models.mkdir(parents=True)
    secs = {}
    for name, fn in (("sd15 (unet, vae, text encoder, tokenizer, scheduler)", lambda: save_sd15_base(paths.base, seed, configs)),
                     ("controlnet-canny", lambda: save_sd15_controlnet(paths.controlnet, seed, configs)),
                     ("clip-vit-large-patch14", lambda: save_clip(paths.clip, seed, configs)),
                     ("resnet50", lambda: save_resnet50(paths.resnet, seed)),
                     ("torch.hub metric weights", lambda: plant_torch_hub_weights(paths.torch_home, seed))):
        t0 = time.perf_counter()
        fn()
        secs[name] = round(time.perf_counter() - t0, 1)
        log(f"models: {name} written in {secs[name]} s")
    stamp_file.write_text(stamp)
    return {"reused": False, "seconds": secs}


# ---------------------------------------------------------------------------------------------
# LoRAs: full-size kohya key sets with seeded random weights
# ---------------------------------------------------------------------------------------------

KOHYA_UNET = ("Transformer2DModel",)
KOHYA_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE = ("CLIPAttention", "CLIPMLP")


def kohya_modules(unet, text_encoder, locon: bool = False, text: bool = True) -> dict[str, torch.nn.Module]:
    """``{kohya key prefix: module}`` the way kohya-ss sd-scripts (``networks/lora.py``) picks them:
    every Linear / 1x1 Conv2d inside a ``Transformer2DModel`` (UNet) and ``CLIPAttention``/``CLIPMLP``
    (text encoder); LoCon adds ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` with their 3x3 convs.
    Works on meta-device models (names and shapes only)."""
    out = {}
    parts = [("lora_unet_", unet, KOHYA_UNET + (KOHYA_UNET_CONV if locon else ()))]
    if text:
        parts.append(("lora_te_", text_encoder, KOHYA_TE))
    for prefix, model, targets in parts:
        for name, mod in model.named_modules():
            if type(mod).__name__ not in targets:
                continue
            for child_name, child in mod.named_modules():
                is_conv = isinstance(child, torch.nn.Conv2d)
                if isinstance(child, torch.nn.Linear) or (is_conv and (child.kernel_size == (1, 1) or locon)):
                    full = f"{name}.{child_name}" if child_name else name
                    if prefix == "lora_te_" and not full.startswith("text_model."):
                        full = "text_model." + full  # files made with transformers 4 (CLIPTextModel.text_model)
                    out[prefix + full.replace(".", "_")] = child
    return out


def make_lora_file(spec: LoraSpec, path: str | Path, unet, text_encoder, seed: int = 0) -> dict:
    """A full-size kohya LoRA/LoCon file (fp16, as Civitai ships them) with seeded random weights.

    ``lora_down`` ~ N(0, 1/fan_in), ``lora_up`` small, so the change of every weight is a few
    per mille of its size: the LoRA changes the images without swamping the random base model.
    """
    from safetensors.torch import save_file

    mods = kohya_modules(unet, text_encoder, locon=spec.layout == "locon", text=spec.text_encoder)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{spec.slug}".encode()).digest()[:4], "little"))
    sd = {}
    for key, m in mods.items():
        conv3 = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        r, alpha = (spec.conv_rank, spec.conv_alpha) if conv3 and spec.conv_rank else (spec.rank, spec.alpha)
        if isinstance(m, torch.nn.Linear):
            down, up = (r, m.in_features), (m.out_features, r)
        else:
            down, up = (r, m.in_channels, *m.kernel_size), (m.out_channels, r, 1, 1)
        fan_in = math.prod(down[1:])
        dt = getattr(torch, spec.dtype)
        sd[f"{key}.lora_down.weight"] = (torch.randn(down, generator=g) / math.sqrt(fan_in)).to(dt)
        sd[f"{key}.lora_up.weight"] = (torch.randn(up, generator=g) * 1e-3).to(dt)
        sd[f"{key}.alpha"] = torch.tensor(float(alpha)).to(dt)
    meta = {"ss_network_module": "networks.lora" if spec.layout == "lora" else "lycoris.kohya",
            "ss_network_dim": str(spec.rank), "ss_network_alpha": str(spec.alpha),
            "ss_base_model_version": "sd_v1", "lorafind_dryrun": "seeded random weights"}
    if spec.layout == "locon":
        meta["ss_network_args"] = json.dumps({"algo": "locon", "conv_dim": spec.conv_rank, "conv_alpha": spec.conv_alpha})
    save_file(sd, str(path), metadata=meta)
    # loras.read_safetensors_header takes a file whose first byte is 0x80 for a pickle, but that is
    # also a safetensors file whose header length ends in 0x80 (1 in 256 files; see the report and
    # tests/test_dryrun.py::test_safetensors_header_length_ending_in_0x80_is_not_a_pickle): pad the
    # metadata so that the dry run gets past it.
    while Path(path).read_bytes()[:1] == b"\x80":
        meta["lorafind_pad"] = meta.get("lorafind_pad", "") + "_"
        save_file(sd, str(path), metadata=meta)
    return {"slug": spec.slug, "modules": len(mods), "bytes": Path(path).stat().st_size}


def prepare_loras(paths: Paths, counts: Counts, seed: int = 0, configs: ModelConfigs | None = None) -> list[dict]:
    """The stand-in LoRA files in ``paths.loras`` and a catalog naming them (``paths.catalog``),
    its entries taken from ``data/loras/paper.yaml`` (name, short, Civitai ids; no download URL)."""
    import yaml

    paper = yaml.safe_load((project_root() / "data" / "loras" / "paper.yaml").read_text())
    by_slug = {e["slug"]: e for e in paper["loras"]}
    unet, te = meta_models(configs)
    paths.loras.mkdir(parents=True, exist_ok=True)
    entries, made = [], []
    for spec in LORAS[: counts.loras]:
        path = paths.loras / f"{spec.slug}.safetensors"
        made.append(make_lora_file(spec, path, unet, te, seed))
        e = {k: v for k, v in by_slug[spec.slug].items() if k not in ("url", "sha256")}
        desc = f"kohya {'LoCon' if spec.layout == 'locon' else 'LoRA'} rank {spec.rank}" + (
            f", conv rank {spec.conv_rank}" if spec.conv_rank else "") + ("" if spec.text_encoder else ", UNet only")
        e.update(file=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                 dryrun=f"seeded random weights, {desc}")
        entries.append(e)
    paths.catalog.write_text(yaml.safe_dump({"base_model": paper.get("base_model", "SD 1.5"), "loras": entries},
                                            sort_keys=False))
    return made


# ---------------------------------------------------------------------------------------------
# Images: base sets and stage-05 thumbnails from the repository's own photos
# ---------------------------------------------------------------------------------------------


def _manifest_rows(folder: Path) -> tuple[list[str], list[dict]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def prepare_images(paths: Paths, counts: Counts) -> dict:
    """The first photos of ``data/images/{variety,faces}`` as the two base sets (with their manifest
    rows; variety holds ``counts.style_images`` for stage 07's demo style set), and
    ``counts.thumbnails`` other photos per LoRA as its stage-05 "thumbnails" (in place of the
    Civitai previews, with the manifest ``lorafind fetch`` writes)."""
    from .files import write_json_atomic

    import yaml

    sets = {}
    for name in ("variety", "faces"):
        src = project_root() / "data" / "images" / name
        cols, rows = _manifest_rows(src)
        dst = paths.base_images / name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        # variety also feeds stage 07's demo style set: it holds enough photos for that, and
        # stage 01 restyles the first counts.images of each set (max_images)
        keep = rows[: max(counts.images, counts.style_images) if name == "variety" else counts.images]
        for r in keep:
            shutil.copyfile(src / r["file"], dst / r["file"])
        with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(keep)
        sets[name] = str(dst)
    # thumbnails: photos the base sets do not use (variety after the first counts.images)
    src = project_root() / "data" / "images" / "variety"
    _, rows = _manifest_rows(src)
    spare = rows[max(counts.images, counts.style_images):]
    slugs = [e["slug"] for e in yaml.safe_load(paths.catalog.read_text())["loras"]]
    folder = layout.thumbnails_dir({"runs_dir": str(paths.runs)})
    queries = []
    for k, slug in enumerate(slugs):
        for j in range(counts.thumbnails):
            r = spare[(k * counts.thumbnails + j) % len(spare)]
            name = f"{j:02d}{Path(r['file']).suffix.lower()}"
            rel = layout.query_rel(slug, name)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / r["file"], folder / rel)
            queries.append({"file": rel, "lora": slug,
                            "how": f"dry-run stand-in for a Civitai preview image (photo {r['file']})"})
    write_json_atomic({"queries": queries, "versions": {}}, layout.queries_manifest(folder))
    return {"sets": sets, "thumbnails": len(queries)}


# ---------------------------------------------------------------------------------------------
# The profile overrides
# ---------------------------------------------------------------------------------------------


def overrides(paths: Paths, counts: Counts = DEFAULT, threads: int | None = None, extra: dict | None = None) -> dict:
    """What :func:`~lorafind_utils.config.load_profile` ("paper", overrides) needs for the dry run:
    the local models, catalog, LoRA folder, base images and output folders, ``device: cpu`` and the
    counts cut down; every other parameter stays the paper profile's.

    :param threads: torch threads for the one worker of stages 01/03/04 (default: all cores).
    :param extra: more overrides merged over these (tests: a smaller resolution).
    """
    from .config import load_profile

    counts.check()
    threads = int(threads or os.cpu_count() or 1)
    paper = load_profile("paper")["stages"]
    p07 = paper["07_train_style_lora"]
    feature_net = p07["feature_net"] if _has_torch_fidelity() or p07["feature_net"] != "inception" else "efficientnet_lite0"
    ov = {
        "description": (f"Dry run of the paper profile on CPU: its settings with the counts cut ({counts.loras} LoRAs x "
                        f"{counts.images} base images per set, {counts.steps} steps, {counts.epochs} epoch), seeded "
                        "random weights in the published architectures. Its numbers measure time and memory only."),
        "device": "cpu",
        "models": {"base": str(paths.base), "controlnet": str(paths.controlnet)},
        "catalog": str(paths.catalog),
        "lora_dir": str(paths.loras),
        "base_images": {"variety": str(paths.base_images / "variety"), "faces": str(paths.base_images / "faces")},
        "runs_dir": str(paths.runs),
        "figures_dir": str(paths.figures),
        "stages": {
            # CPU: one worker with every core (a second 512-px pipeline would double the ~6 GB);
            # float32 (load_pipeline uses float32 on CPU whatever the profile says).
            "01_synthesize": {"steps": counts.steps, "max_images": counts.images, "batch_size": counts.images,
                              "dtype": "float32",
                              "workers": 1, "threads": threads},
            "02_finetune": {"epochs": counts.epochs, "weights": str(paths.resnet)},
            "03_ablate_sizes": {"sizes": list(counts.sizes), "seeds": list(counts.seeds), "epochs": counts.epochs,
                                "workers": 1, "threads": threads},
            "04_domain_vs_variety": {"n": counts.n_domain, "seeds": list(counts.seeds), "epochs": counts.epochs,
                                     "workers": 1, "threads": threads},
            "05_retrieve_thumbnails": {},  # the paper's: make_queries false, <runs_dir>/thumbnails
            "06_generate": {"queries": list(counts.queries)},
            "07_train_style_lora": {"n_style_images": counts.style_images, "ranks": list(counts.ranks),
                                    "steps": counts.lora_steps, "batch_size": counts.lora_batch,
                                    "eval_prompts": list(p07["eval_prompts"][: counts.eval_prompts]),
                                    "eval_seeds": list(counts.eval_seeds), "infer_steps": counts.infer_steps,
                                    "feature_net": feature_net, "clip_model": str(paths.clip)},
            "08_index": {"epochs": counts.index_epochs, "seeds": list(counts.seeds), "add_images": counts.add_images,
                         "open_set_images": counts.open_set_images, "folds": counts.folds,
                         "latency_queries": counts.latency_queries},
        },
    }
    if extra:
        ov = merge(ov, extra)
    return ov


def deviations(ov: dict) -> list[str]:
    """Every setting in which the dry run differs from the paper profile (besides paths)."""
    from .config import load_profile

    paper = load_profile("paper")
    out = []
    for stage, values in ov["stages"].items():
        for k, v in values.items():
            if paper["stages"][stage][k] != v and k not in ("weights", "clip_model"):
                out.append(f"{stage}.{k}: {paper['stages'][stage][k]!r} -> {v!r}")
    out.append(f"device: {paper['device']!r} -> 'cpu'")
    out.append("02_finetune.weights: imagenet -> seeded random ResNet50 file (the `weights: <path>` option)")
    out.append("07_train_style_lora.clip_model: openai/clip-vit-large-patch14 -> a seeded random folder of that architecture")
    out.append("07_train_style_lora metric networks (Inception for FID/KID/IS, LPIPS AlexNet): the paper's, with seeded "
               "random weights in a TORCH_HOME under the dry-run folder"
               + ("" if _has_torch_fidelity() else "; feature_net inception -> efficientnet_lite0 (torch-fidelity "
                                                   "is not installed)"))
    out.append(f"models: the published SD1.5 / ControlNet-Canny architectures with seeded random weights; catalog: "
               f"{ov['catalog']} ({len(yaml_loras(ov['catalog']))} stand-in LoRAs named after data/loras/paper.yaml)"
               if Path(ov["catalog"]).exists() else "models: seeded random weights")
    out.append("base images: the repository's own photos (data/images/variety, faces); stage-05 thumbnails: "
               "other photos of data/images/variety in place of the Civitai previews")
    return out


def yaml_loras(path) -> list:
    import yaml

    return yaml.safe_load(Path(path).read_text())["loras"]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (papermill's kernels)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class StageDisk:
    """A ``log`` for :func:`~lorafind_utils.runner.run_study` that measures the disk each notebook
    writes: the dry-run folder's size (models excluded) when the runner announces a notebook and
    when it reports it done."""

    START = re.compile(r"^\[(\d\d_[A-Za-z0-9_]+)\] running")
    DONE = re.compile(r"^\[(\d\d_[A-Za-z0-9_]+)\] done")

    def __init__(self, root: Path, exclude: tuple[Path, ...], log=print):
        self.root, self.exclude, self.log = root, exclude, log
        self.before: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.cpu0: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}  # CPU seconds of the notebook's kernel (and its workers), once reaped
        self.started: dict[str, float] = {}
        self.current: str | None = None

    def size(self) -> int:
        return tree_bytes(self.root, self.exclude)

    def __call__(self, msg: str) -> None:
        m = self.START.match(msg)
        if m:
            self.current = m.group(1)
            self.before[self.current] = self.size()
            self.started[self.current] = time.time()
            self.cpu0[self.current] = _children_cpu()
        self.log(msg)
        m = self.DONE.match(msg)
        if m:
            self.close(m.group(1))

    def close(self, stage: str | None = None) -> None:
        stage = stage or self.current
        if stage and stage in self.before and stage not in self.written:
            self.written[stage] = self.size() - self.before[stage]
            self.cpu_s[stage] = round(_children_cpu() - self.cpu0[stage], 1)


@contextmanager
def environment(paths: Paths):
    """The environment of the dry run (inherited by papermill's kernels and their workers): offline,
    the metric networks' torch.hub cache, an empty Hugging Face cache."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(paths.hf_home),
           "TORCH_HOME": str(paths.torch_home), "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# FLOPs (torch.utils.flop_counter on meta-device models: exact counts, no memory, seconds)
# ---------------------------------------------------------------------------------------------


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def measure_flops(resolution: int = 512, classifier_size: int = 224, lora_rank: int = 4, n_classes: int = 12) -> dict:
    """FLOPs of the pieces of the paper's work, counted by ``FlopCounterMode`` on the full-size
    models built on the meta device (same shapes, no weights; the counter sees every matmul/conv).

    * ``unet_step`` / ``controlnet_step``: one denoising step at ``resolution`` px, batch 1, no guidance;
    * ``vae_encode`` / ``vae_decode`` / ``text_encoder``: once per image;
    * ``lora_train_step``: one stage-07 training image (UNet forward + backward with a rank-``lora_rank``
      LoRA on the attention projections; the frozen weights get no gradient);
    * ``resnet_train_image`` / ``resnet_eval_image``: one 224-px image through the stage-02 classifier
      (forward + backward with layer3, layer4 and the head trainable / forward only).
    """
    from peft import LoraConfig

    from . import sd15_configs as C
    from .classifier import build_model, set_trainable, train_mode
    from .lora_training import TARGET_MODULES

    dev = "meta"
    lat = resolution // 8
    unet, cn, vae, te = C.meta_sd15_unet(), C.meta_sd15_controlnet(), C.meta_sd15_vae(), C.meta_sd15_text_encoder()
    x = torch.randn(1, 4, lat, lat, device=dev)
    t = torch.tensor([500], device=dev)
    txt = torch.randn(1, 77, 768, device=dev)
    cond = torch.randn(1, 3, resolution, resolution, device=dev)
    out = {}
    with torch.no_grad():
        res = {}

        def _cn():
            res["d"], res["m"] = cn(x, t, encoder_hidden_states=txt, controlnet_cond=cond, return_dict=False)

        out["controlnet_step"] = _count(_cn)
        out["unet_step"] = _count(lambda: unet(x, t, encoder_hidden_states=txt, down_block_additional_residuals=res["d"],
                                               mid_block_additional_residual=res["m"]))
        out["unet_step_plain"] = _count(lambda: unet(x, t, encoder_hidden_states=txt))
        out["vae_encode"] = _count(lambda: vae.encode(cond))
        out["vae_decode"] = _count(lambda: vae.decode(x))
        out["text_encoder"] = _count(lambda: te(torch.zeros(1, 77, dtype=torch.long, device=dev)))
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)

    def _train():
        loss = unet(x, t, txt).sample.float().pow(2).mean()
        loss.backward()

    out["lora_train_step"] = _count(_train)
    with torch.device(dev):
        model = build_model(n_classes, weights="none", backbone="resnet50")
    set_trainable(model, "finetune")
    img = torch.randn(2, 3, classifier_size, classifier_size, device=dev)

    def _resnet_train():
        train_mode(model)
        torch.nn.functional.cross_entropy(model(img), torch.zeros(2, dtype=torch.long, device=dev)).backward()

    out["resnet_train_image"] = _count(_resnet_train) // 2
    model.eval()
    with torch.no_grad():
        out["resnet_eval_image"] = _count(lambda: model(img)) // 2
    out["clip_image_224"] = None  # not counted: negligible next to the diffusion work
    return {k: v for k, v in out.items() if v is not None}


def lora_training_activation_gb(batch: int = 1, resolution: int = 512, lora_rank: int = 4) -> float:
    """GB (fp32) the autograd graph keeps for the backward pass of one stage-07 training step (SD1.5 UNet
    with a LoRA on the attention projections), counted on the meta device: every tensor saved for
    backward, the model's parameters and repeats of the same tensor left out. fp16 autocast halves it."""
    from peft import LoraConfig

    from . import sd15_configs as C
    from .lora_training import TARGET_MODULES

    unet = C.meta_sd15_unet()
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    recent: list = []
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not any(t is r for r in recent[-64:]):
            recent.append(t)
            total[0] += t.numel() * t.element_size()
        return t

    lat = resolution // 8
    x = torch.randn(batch, 4, lat, lat, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.full((batch,), 500, device="meta"), torch.randn(batch, 77, 768, device="meta"))
    return total[0] / 2**30


def per_image_flops(f: dict, steps: int, strength: float, guidance: bool = False, img2img: bool = True,
                    controlnet: bool = True) -> int:
    """One generated image: text encoder, VAE encode (img2img), the denoising steps actually run
    (``int(steps * strength)`` for img2img), twice with classifier-free guidance, VAE decode."""
    n = int(steps * strength) if img2img else steps
    step = (f["unet_step"] + f["controlnet_step"]) if controlnet else f["unet_step_plain"]
    return int(f["text_encoder"] * (2 if guidance else 1) + (f["vae_encode"] if img2img else 0)
               + n * step * (2 if guidance else 1) + f["vae_decode"])


#: GPUs the estimate can name: dense fp16/bf16 tensor-core peak (no sparsity), FLOP/s
GPUS = {"A100 40GB": 312e12, "A100 80GB": 312e12, "H100 SXM": 989e12, "L4": 121e12, "RTX 4090": 165e12}
#: published throughput the estimate is set beside (the issue quotes diffusers' own ControlNet
#: benchmarks): SD1.5 + ControlNet on an A100, 512 px, 50 steps with guidance, fp16
PUBLISHED_A100_IMG_PER_S = (0.7, 1.1)


def paper_workload(f: dict, n_variety: int = 126, n_faces: int = 126, n_loras: int = 12) -> dict:
    """The paper profile's work in FLOPs, stage by stage, from its own parameters (``configs/paper.yaml``).

    Upper bounds where the run can stop early (every training run is counted for all its epochs).
    ``n_faces``: the size of the faces set is the user's (at least 70, stage 04's ``n``); assumed.
    """
    from .config import load_profile

    s = load_profile("paper")["stages"]
    p1, p2, p3, p4, p6, p7 = (s[k] for k in ("01_synthesize", "02_finetune", "03_ablate_sizes", "04_domain_vs_variety",
                                                "06_generate", "07_train_style_lora"))
    p8 = s.get("08_index")
    restyle = per_image_flops(f, p1["steps"], p1["strength"])
    n_val = math.ceil(p2["val_fraction"] * n_variety)
    n_train = n_variety - n_val
    tr, ev = f["resnet_train_image"], f["resnet_eval_image"]

    def run(n_per_class, epochs):  # one classifier run: train + validate every epoch
        return n_loras * (n_per_class * tr + n_val * ev) * epochs

    sizes = sum(run(n, p3["epochs"]) for n in p3["sizes"]) * len(p3["seeds"])
    domain = run(p4["n"], p4["epochs"]) * len(p4["seeds"])  # the variety runs are stage 03's
    r7 = p7["resolution"]
    assert r7 == p1["resolution"]
    eval_img = per_image_flops(f, p7["infer_steps"], 1.0, guidance=p7["guidance_scale"] > 1, img2img=False,
                               controlnet=False)
    n_eval = (1 + len(p7["ranks"])) * len(p7["eval_seeds"]) * len(p7["eval_prompts"])
    stages = {
        "01_synthesize": {"what": f"{n_loras} LoRAs x ({n_variety} variety + {n_faces} faces) images, "
                                  f"{int(p1['steps'] * p1['strength'])} of {p1['steps']} steps (strength {p1['strength']})",
                          "flops": n_loras * (n_variety + n_faces) * restyle},
        "02_finetune": {"what": f"{n_loras}x{n_train} images x {p2['epochs']} epochs + validation + linear probe",
                        "flops": run(n_train, p2["epochs"]) + n_loras * (n_train + n_val) * ev},
        "03_ablate_sizes": {"what": f"sizes {p3['sizes']} x {len(p3['seeds'])} seeds x {p3['epochs']} epochs",
                            "flops": sizes},
        "04_domain_vs_variety": {"what": f"{p4['n']} faces x {len(p4['seeds'])} seeds x {p4['epochs']} epochs",
                                 "flops": domain},
        "05_retrieve_thumbnails": {"what": "a few hundred classifier forwards", "flops": n_loras * 20 * ev},
        "06_generate": {"what": f"{len(p6['queries'])} queries x 2 generations", "flops": len(p6["queries"]) * 2 * restyle},
        "07_train_style_lora": {"what": f"{len(p7['ranks'])} ranks x {p7['steps']} steps x batch {p7['batch_size']}; "
                                        f"eval {n_eval} images x {p7['infer_steps']} steps with guidance",
                                "flops": len(p7["ranks"]) * p7["steps"] * p7["batch_size"] * f["lora_train_step"]
                                + n_eval * eval_img},
    }
    if p8:  # style encoders (stage 02's trainable layers, bases_per_batch bases x every LoRA per step), folds, `index add`
        steps = max(1, n_train // p8["bases_per_batch"])
        enc = p8["epochs"] * steps * p8["bases_per_batch"] * tr
        n_enc = len(p8["seeds"]) + len([c for c in p8["compare"] if c != "trained"])
        embeds = (n_enc + p8["folds"]) * (n_loras * n_variety + n_loras * 20) * ev
        stages["08_index"] = {
            "what": f"{len(p8['seeds'])} encoders x {p8['epochs']} epochs + {p8['folds']} folds; `index add` of "
                    f"{p8['add_images']} restyled images",
            "flops": n_loras * enc * len(p8["seeds"]) + int(n_loras * 2 / 3) * enc * p8["folds"] + embeds
            + p8["add_images"] * restyle}
    return {"per_restyled_image": restyle, "stages": stages, "total": sum(v["flops"] for v in stages.values()),
            "assumptions": {"n_variety": n_variety, "n_faces": n_faces, "n_loras": n_loras,
                            "early_stopping": "none (every run counted for all epochs)"}}


def gpu_estimate(f: dict, work: dict, gpu: str = "A100 40GB", utilisation: float = 0.3) -> dict:
    """Hours on one ``gpu`` at ``utilisation`` of its dense fp16 peak, per stage and in all, and the
    throughput that implies for the published benchmark setting (SD1.5 + ControlNet, 50 steps, guidance)."""
    peak = GPUS[gpu]
    rate = peak * utilisation
    bench = per_image_flops(f, 50, 1.0, guidance=True, img2img=False, controlnet=True)
    lo, hi = PUBLISHED_A100_IMG_PER_S
    u_lo, u_hi = lo * bench / GPUS["A100 40GB"], hi * bench / GPUS["A100 40GB"]
    return {
        "gpu": gpu, "peak_flops": peak, "utilisation": utilisation,
        "stages_h": {k: v["flops"] / rate / 3600 for k, v in work["stages"].items()},
        "total_h": work["total"] / rate / 3600,
        "benchmark_setting": "SD1.5 + ControlNet, 512 px, 50 steps, guidance (2 UNet+ControlNet passes per step)",
        "benchmark_flops_per_image": bench,
        "implied_img_per_s": rate / bench,
        "published_a100_img_per_s": [lo, hi],
        "published_implies_utilisation": [u_lo, u_hi],
        # the whole study at the utilisations the published throughput implies (slowest first)
        "total_h_at_published_utilisation": [work["total"] / (peak * u_lo) / 3600, work["total"] / (peak * u_hi) / 3600],
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mb(b: float) -> float:
    return round(b / 2**20, 1)


def write_report(paths: Paths, report: dict) -> None:
    from .files import write_json_atomic

    write_json_atomic(report, paths.report_json)
    lines = ["# Dry run of the paper profile on CPU", "",
             f"{report['started']} · {report['machine']} · total {report['total_s']:.0f} s "
             f"({report['total_s'] / 60:.1f} min) · status **{report['status']}**", "",
             "| stage | wall s | CPU s | peak RSS MB | disk MB written |", "|---|---:|---:|---:|---:|"]
    for r in report["stages"]:
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "—"
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {cpu} | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.1f} |")
    lines.append(f"| **total** | **{report['total_s']:.0f}** | | **{max(r['peak_rss_mb'] for r in report['stages']):.0f}** "
                 f"| **{sum(r['disk_mb'] for r in report['stages']):.0f}** |")
    la = report.get("load_average")
    lines += ["", "Preparation rows: this process (peak RSS of the dry-run process); notebook rows: the runner's "
              "records (kernel and its workers, RSS summed); CPU s: the kernel's user + system time. Disk: growth "
              "of the dry-run folder (the models' row: what stays while it runs; they are removed at the end "
              "unless --keep-models)."
              + (f" Load average (1 min) at start / end: {la[0]:.1f} / {la[1]:.1f} on {os.cpu_count()} cores: "
                 "other processes shared the CPU, so wall times are upper bounds; CPU seconds are not inflated "
                 "that way." if la else ""), ""]
    if report.get("error"):
        lines += [f"**Failed:** {report['error']}", ""]
    fl = report.get("flops")
    if fl:
        f, w, g = fl["components"], fl["paper_workload"], fl["gpu_estimate"]
        T = 1e12
        lines += ["## FLOPs (torch.utils.flop_counter.FlopCounterMode, full-size models)", "",
                  "| piece | TFLOPs |", "|---|---:|"]
        lines += [f"| {k} | {v / T:.3f} |" for k, v in f.items()]
        lines += ["", f"Per restyled 512-px image (paper stage 01: text encoder + VAE encode + "
                      f"{fl['restyle_steps']} x (UNet + ControlNet) + VAE decode): **{w['per_restyled_image'] / T:.2f} TFLOPs**; "
                      f"per ResNet50 training image at 224 px: **{f['resnet_train_image'] / 1e9:.1f} GFLOPs** "
                      f"(evaluation {f['resnet_eval_image'] / 1e9:.1f}).", "",
                  f"## Estimate of the whole paper study on one {g['gpu']}", "",
                  f"At {100 * g['utilisation']:.0f} % of its {g['peak_flops'] / T:.0f} TFLOP/s dense fp16 peak; "
                  f"assumptions: {w['assumptions']}.", "",
                  "| stage | work | PFLOPs | GPU hours |", "|---|---|---:|---:|"]
        for k, v in w["stages"].items():
            lines.append(f"| {k} | {v['what']} | {v['flops'] / 1e15:.1f} | {g['stages_h'][k]:.2f} |")
        lines += [f"| **total** | | {w['total'] / 1e15:.1f} | **{g['total_h']:.1f}** |", "",
                  f"Check against published throughput: {g['benchmark_setting']} is "
                  f"{g['benchmark_flops_per_image'] / T:.1f} TFLOPs per image, so the assumed utilisation implies "
                  f"{g['implied_img_per_s']:.2f} images/s; diffusers' benchmarks report about "
                  f"{g['published_a100_img_per_s'][0]}-{g['published_a100_img_per_s'][1]} images/s on an A100, i.e. "
                  f"{100 * g['published_implies_utilisation'][0]:.0f}-{100 * g['published_implies_utilisation'][1]:.0f} % "
                  f"utilisation; at those, the whole study takes {g['total_h_at_published_utilisation'][0]:.1f}-"
                  f"{g['total_h_at_published_utilisation'][1]:.1f} h. Not measured on a GPU.", ""]
    if fl and fl.get("memory"):
        lines += ["## Stage 07 training memory (meta-device count of what autograd keeps for backward)", ""]
        lines += [f"- {k}: {v} GB" for k, v in fl["memory"].items()]
        lines += ["", "In fp32 the paper's batch 4 leaves little headroom on a 40 GB GPU (activations + weights "
                  "~33 GB before CUDA's own); train_lora now trains under fp16 autocast on CUDA (about half the "
                  "activations).", ""]
    if fl:
        lines += ["The FLOP estimate is a lower bound where the work is small (stages 02-06, 08: data loading, "
                  "Python and kernel launches dominate a 224-px ResNet50 at batch 32), and it assumes fp16 on tensor "
                  "cores: stage 07's training ran in fp32 before this change (A100 fp32 without tensor cores: "
                  "19.5 TFLOP/s, about 16x slower than the fp16 peak); its evaluation pipeline still loads in fp32.", ""]
    lines += ["## Settings that differ from the paper profile", ""] + [f"- {d}" for d in report["deviations"]] + [""]
    paths.report_md.write_text("\n".join(lines))


def flops_section(ov_stage01: dict, gpu: str = "A100 40GB", utilisation: float = 0.3) -> dict:
    """The report's FLOPs: the pieces, the paper's workload, the GPU estimate."""
    from . import sd15_configs as C
    from .config import load_profile

    comp = measure_flops()
    work = paper_workload(comp)
    est = gpu_estimate(comp, work, gpu, utilisation)
    p1 = load_profile("paper")["stages"]["01_synthesize"]
    p7 = load_profile("paper")["stages"]["07_train_style_lora"]
    memory = {"lora_train_activations_gb_fp32_batch1": round(lora_training_activation_gb(1), 2),
              f"lora_train_activations_gb_fp32_batch{p7['batch_size']}": round(lora_training_activation_gb(p7["batch_size"]), 2),
              "sd15_unet_vae_text_encoder_weights_gb_fp32": round(4 * (C.SD15_UNET_PARAMS + C.SD15_VAE_PARAMS
                                                                        + C.SD15_TEXT_ENCODER_PARAMS) / 2**30, 2)}
    return {"components": comp, "paper_workload": work, "gpu_estimate": est, "memory": memory,
            "restyle_steps": int(p1["steps"] * p1["strength"]),
            "dryrun_restyle_image": per_image_flops(comp, ov_stage01["steps"], p1["strength"]),
            "note": "counted on meta-device models of the published architectures (exact shapes)"}


def rewrite_report(root: str | Path | None = None, gpu: str = "A100 40GB", utilisation: float = 0.3) -> dict:
    """Recount the FLOPs and the estimate (another GPU or utilisation) and rewrite an earlier run's report."""
    paths = dryrun_paths(root)
    report = json.loads(paths.report_json.read_text())
    report["flops"] = flops_section(report["overrides"]["stages"]["01_synthesize"], gpu, utilisation)
    report["deviations"] = deviations(report["overrides"])
    write_report(paths, report)
    return report


def run_dryrun(root: str | Path | None = None, counts: Counts = DEFAULT, keep_models: bool = False,
               only: list[str] | None = None, start: str | None = None, threads: int | None = None, seed: int = 0,
               gpu: str = "A100 40GB",
               utilisation: float = 0.3, log=print) -> dict:
    """Prepare the dry-run folder, run notebooks 01-07 of the paper profile through the runner,
    count FLOPs, write ``report.json`` and ``report.md``.

    Earlier outputs are removed first (the measurements are of a fresh run) unless ``only`` or
    ``start`` ask for a part, which continues them; the models are rebuilt unless ``keep_models``
    and they are in place, and deleted at the end unless ``keep_models``.

    :param only: notebooks to run (``["01"]``), ``start``: from this one on; default all.
    :return: the report.
    """
    from . import runner

    counts.check()
    paths = dryrun_paths(root)
    t_start = time.perf_counter()
    fresh = not (only or start)  # a partial run continues the earlier one's outputs
    for p in (paths.runs, paths.figures, paths.papermill, paths.loras, paths.base_images, paths.hf_home,
              paths.catalog, paths.report_json, paths.report_md) if fresh else ():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    paths.root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": asdict(counts), "status": "running",
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "root": str(paths.root), "stages": []}
    prep = [("prepare: models", lambda: prepare_models(paths, seed, reuse=keep_models, log=log), paths.models),
            ("prepare: LoRAs + catalog", lambda: prepare_loras(paths, counts, seed), None),
            ("prepare: base images + thumbnails", lambda: prepare_images(paths, counts), None)]
    for name, fn, _ in prep:
        before = tree_bytes(paths.root)
        t0 = time.perf_counter()
        with PeakRSS(interval=0.2, children=False) as mem:
            info = fn()
        report["stages"].append({"stage": name, "wall_s": round(time.perf_counter() - t0, 2),
                                 "peak_rss_mb": _mb(mem.peak), "disk_mb": _mb(tree_bytes(paths.root) - before),
                                 "info": info if isinstance(info, dict) else {"files": info}})
        log(f"{name}: {report['stages'][-1]['wall_s']} s")
    ov = overrides(paths, counts, threads)
    report["overrides"] = ov
    report["deviations"] = deviations(ov)
    disk = StageDisk(paths.root, (paths.models,), log)
    from .records import read_records

    records = layout.records_file({"runs_dir": str(paths.runs)})
    n_before = len(read_records(records))
    error = None
    with environment(paths):
        try:
            runner.run_study("paper", only=only, start=start, overrides=ov, output_dir=paths.papermill, log=disk)
        except runner.StageFailed as e:
            error = str(e)
            disk.close()
    earlier = {}  # a partial run keeps the earlier run's rows of the notebooks it did not run
    if not fresh and paths.report_json.exists():
        old = json.loads(paths.report_json.read_text())
        earlier = {r["stage"]: r for r in old.get("stages", []) if r["stage"][:2].isdigit()}
    rows = []
    for rec in read_records(records)[n_before:]:
        earlier.pop(rec["stage"], None)
        rows.append({"stage": rec["stage"], "wall_s": rec["wall_s"], "peak_rss_mb": rec["peak_rss_mb"],
                                 "disk_mb": _mb(disk.written.get(rec["stage"], 0)),
                                 "cpu_s": disk.cpu_s.get(rec["stage"]), "status": rec["status"],
                                 **({"error": rec["error"]} if rec.get("error") else {})})
    report["stages"] += sorted(list(earlier.values()) + rows, key=lambda r: r["stage"])
    t0 = time.perf_counter()
    with PeakRSS(interval=0.2, children=False) as mem:
        report["flops"] = flops_section(ov["stages"]["01_synthesize"], gpu, utilisation)
    report["stages"].append({"stage": "FLOP count (meta device)", "wall_s": round(time.perf_counter() - t0, 2),
                             "peak_rss_mb": _mb(mem.peak), "disk_mb": 0.0})
    if not keep_models and paths.models.exists():
        shutil.rmtree(paths.models)
        log(f"models removed ({paths.models}); --keep-models keeps them for the next run")
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["load_average"] = [load0, os.getloadavg()[0]]
    report["status"] = "failed" if error else "ok"
    if error:
        report["error"] = error
    write_report(paths, report)
    log(f"report: {paths.report_md}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorafind_utils.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-models", action="store_true",
                    help="reuse the models already in runs/dryrun/models and keep them afterwards (~8 GB)")
    ap.add_argument("--smoke", action="store_true", help="the smallest counts (4 LoRAs x 3 images per set, 1 denoising step)")
    ap.add_argument("--only", nargs="+", help="run only these notebooks (e.g. 01 02), continuing an earlier run")
    ap.add_argument("--from", dest="start", help="start at this notebook (e.g. 05), continuing an earlier run")
    ap.add_argument("--root", default=DRYRUN_DIR, help="the dry-run folder (default runs/dryrun)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--gpu", default="A100 40GB", choices=sorted(GPUS), help="GPU of the estimate")
    ap.add_argument("--utilisation", type=float, default=0.3, help="assumed share of the GPU's dense fp16 peak")
    ap.add_argument("--report-only", action="store_true", help="recount FLOPs and rewrite an earlier run's report")
    a = ap.parse_args(argv)
    if a.report_only:
        rewrite_report(a.root, a.gpu, a.utilisation)
        print(Path(dryrun_paths(a.root).report_md).read_text())
        return 0
    report = run_dryrun(a.root, SMOKE if a.smoke else DEFAULT, keep_models=a.keep_models, only=a.only,
                        start=a.start, threads=a.threads, gpu=a.gpu, utilisation=a.utilisation)
    print(Path(dryrun_paths(a.root).report_md).read_text())
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
