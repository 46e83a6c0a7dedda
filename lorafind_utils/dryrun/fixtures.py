"""The dry run's weight-free fixtures: full-size SD1.5, ControlNet, CLIP, ResNet50 and Inception with seeded
weights, kohya LoRA files and base images, and the counts it cuts the paper profile to."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafind_utils.core import layout
from lorafind_utils.core.config import project_root
from lorafind_utils.core.layout import DryRunPaths as Paths  # noqa: E402  (the folder's layout lives with every other path)

#: the dry run's folder (everything it writes)
DRYRUN_DIR = "runs/dryrun"


#: bumped when the models written by :func:`prepare_models` change (their folder is rebuilt)
MODELS_VERSION = "1"


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
    latency_entries: int = 1000  # stage 08: the index padded to this many entries for the second latency row

    def check(self) -> Counts:
        if not 4 <= self.loras <= len(LORAS):
            raise ValueError(f"loras must be 4..{len(LORAS)} (fewer classes break stage 03's top-3 accuracy)")
        n_train = self.images - math.ceil(0.2 * self.images)
        if self.images < 3 or max(self.sizes) > n_train or self.n_domain > min(n_train, self.images):
            raise ValueError(
                f"with {self.images} base images per set (at least 3: stage 08's encoder needs 2 to "
                f"train), {n_train} train: sizes {self.sizes} and n_domain {self.n_domain} must not exceed that"
            )
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


def dryrun_paths(root: str | Path | None = None) -> Paths:
    return layout.dryrun_paths(root or DRYRUN_DIR)


def _stamp(seed: int, configs: ModelConfigs) -> str:
    from lorafind_utils.models import hub_configs as C

    cfgs = [asdict(configs), C.SD15_SCHEDULER_CONFIG]
    h = hashlib.sha256(json.dumps(cfgs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return json.dumps({"version": MODELS_VERSION, "seed": seed, "configs": h, "torch_fidelity": has_torch_fidelity()})


def has_torch_fidelity() -> bool:
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
    from lorafind_utils.models import hub_configs as C

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
        return UNet2DConditionModel.from_config(dict(configs.unet)), CLIPTextModel(
            _clip_text_config(configs.text_encoder)
        )


def save_sd15_base(folder: str | Path, seed: int = 0, configs: ModelConfigs | None = None) -> Path:
    """SD1.5 with seeded random weights in the layout of the hub snapshot ``lorafind fetch`` downloads
    (fp32 safetensors, no safety checker): one component at a time, so only one is in memory."""
    import diffusers
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    from lorafind_utils.models import hub_configs as C

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
    from lorafind_utils.models.standins import build_clip_tokenizer

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

    from lorafind_utils.models.standins import build_clip_tokenizer

    configs = configs or full_configs()
    c = configs.clip
    folder = Path(folder)
    torch.manual_seed(seed + 5)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(c["text_config"]),
            vision_config=dict(c["vision_config"]),
            projection_dim=c["projection_dim"],
            logit_scale_init_value=c["logit_scale_init_value"],
        )
    )
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
    if has_torch_fidelity():
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


def prepare_models(
    paths: Paths, seed: int = 0, reuse: bool = True, log=print, configs: ModelConfigs | None = None
) -> dict:
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
    for name, fn in (
        ("sd15 (unet, vae, text encoder, tokenizer, scheduler)", lambda: save_sd15_base(paths.base, seed, configs)),
        ("controlnet-canny", lambda: save_sd15_controlnet(paths.controlnet, seed, configs)),
        ("clip-vit-large-patch14", lambda: save_clip(paths.clip, seed, configs)),
        ("resnet50", lambda: save_resnet50(paths.resnet, seed)),
        ("torch.hub metric weights", lambda: plant_torch_hub_weights(paths.torch_home, seed)),
    ):
        t0 = time.perf_counter()
        fn()
        secs[name] = round(time.perf_counter() - t0, 1)
        log(f"models: {name} written in {secs[name]} s")
    stamp_file.write_text(stamp)
    return {"reused": False, "seconds": secs}


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
    g = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}|{spec.slug}".encode()).digest()[:4], "little")
    )
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
        meta["ss_network_args"] = json.dumps(
            {"algo": "locon", "conv_dim": spec.conv_rank, "conv_alpha": spec.conv_alpha}
        )
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


def _manifest_rows(folder: Path) -> tuple[list[str], list[dict]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def prepare_images(paths: Paths, counts: Counts) -> dict:
    """The first photos of ``data/images/{variety,faces}`` as the two base sets (with their manifest
    rows; variety holds ``counts.style_images`` for stage 07's demo style set), and
    ``counts.thumbnails`` other photos per LoRA as its stage-05 "thumbnails" (in place of the
    Civitai previews, with the manifest ``lorafind fetch`` writes)."""
    import yaml

    from lorafind_utils.core.files import write_json_atomic

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
