"""Seeded, SD1.5-shaped stand-in models for the offline ``tiny`` profile and the tests.

No model hub is reachable offline, so the tiny profile builds its models from
configs with seeded weights, writes them once with ``save_pretrained`` and then
loads them with ``from_pretrained`` -- exactly the path the paper profile takes
with ``stable-diffusion-v1-5/stable-diffusion-v1-5``. The module layout mirrors
SD1.5 (cross-attention down/up blocks, a 4-level VAE with scale factor 8, a CLIP
text encoder with the real 49,408-token BPE vocabulary), so kohya-format LoRA
keys name the same kind of modules they name in the real model.
"""
from __future__ import annotations

import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from lorafind_utils.core.files import atomic_path

#: Bumped whenever the tiny architecture or weights change (cache invalidation).
TINY_MODEL_VERSION = "5"

UNET_OUT_GAIN = 4.0
CROSS_ATTN_GAIN = 25.0

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


#: the stand-ins' (and the tiny world's) CLIP text encoder: SD1.5's tokenizer ids, miniature widths
TEXT_CONFIG = dict(
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=4,
    projection_dim=32,
    vocab_size=49408,
    max_position_embeddings=77,
)


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that ships inside the ``open_clip_torch`` wheel (MIT)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table used by GPT-2 / CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_tokenizer(folder: Path):
    """Write ``vocab.json`` + ``merges.txt`` of the real CLIP tokenizer and load it.

    :param folder: where the tokenizer files go (``save_pretrained`` layout).
    :return: a ``transformers.CLIPTokenizer`` whose ids match OpenAI CLIP's.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    # transformers 5.x silently ignores vocab_file=/merges_file= keywords: pass them positionally.
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    return tok


def _seeded_(module: torch.nn.Module, generator: torch.Generator, std: float) -> None:
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def set_pooling_vae_weights_(vae, out_gain: float = 0.2) -> None:
    """Set an AutoencoderKL's weights by hand so it is a near-identity codec.

    A VAE with random weights turns every image into the same coloured noise, so
    nothing of the base image would survive and a LoRA's effect would be lost in
    it. Instead: every resnet and attention block is made an identity (zero output
    projection, so only the residual path remains); the encoder averages 2x2 pixels
    per level (8x8 per latent cell, RGB in latent channels 0-2) and the decoder
    upsamples with a smoothing kernel. The GroupNorm before each ``conv_out`` is
    kept near-linear (small gain, large offset before SiLU) and the offset is
    removed by subtracting an all-zero channel. The result: latents that are a
    contrast-normalised 8x downsampled image (std ~2), and a decoder that maps them
    back to a blurred, auto-levelled picture. The UNet and ControlNet stay random.
    """
    c = vae.config.block_out_channels[0]
    gamma, beta = 0.1, 3.0
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(gamma)
                m.bias.fill_(beta)
        enc, dec = vae.encoder, vae.decoder
        for ch in range(3):
            enc.conv_in.weight[ch, ch, 1, 1] = 1.0
            for blk in enc.down_blocks:
                for ds in blk.downsamplers or []:
                    ds.conv.weight[ch, ch, 0:2, 0:2] = 0.25  # 2x2 average (padding is right/bottom)
            # latent_ch = (y_ch - y_zero) / gamma: undo the GroupNorm gain and offset.
            enc.conv_out.weight[ch, ch, 1, 1] = 1.0 / gamma
            enc.conv_out.weight[ch, c - 1, 1, 1] = -1.0 / gamma
            dec.conv_in.weight[ch, ch, 1, 1] = 1.0
            blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
            for blk in dec.up_blocks:
                for us in blk.upsamplers or []:
                    us.conv.weight[ch, ch] = blur
            dec.conv_out.weight[ch, ch, 1, 1] = out_gain / gamma
            dec.conv_out.weight[ch, c - 1, 1, 1] = -out_gain / gamma
        enc.conv_out.bias[4:].fill_(-30.0)  # log-variance: a (near) deterministic encoder
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])


def build_tiny_components(seed: int = 0) -> dict:
    """Build the tiny SD1.5-shaped components in memory with seeded weights.

    :param seed: seed for every weight that is not left at its constructor value.
    :return: dict with unet, vae, text_encoder, tokenizer (None: built on save), scheduler, controlnet.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    with torch.no_grad():
        # Louder noise predictions: the random UNet (and so every LoRA on it) visibly
        # restyles the image instead of adding a faint ripple to it.
        unet.conv_out.weight.mul_(UNET_OUT_GAIN)
        # Louder cross-attention: with the empty prompt the text tokens are constant, so
        # this path adds a content-independent signature that TE/attn2 LoRAs change.
        for name, m in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                m.weight.mul_(CROSS_ATTN_GAIN)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=1,
        sample_size=64,
        scaling_factor=1.0,
    )
    set_pooling_vae_weights_(vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    controlnet = ControlNetModel.from_unet(unet)
    # from_unet leaves the "zero convs" at zero, so the control image would have no
    # effect at all; give them seeded weights so Canny edges steer the tiny model.
    g = torch.Generator().manual_seed(seed + 1)
    for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
        _seeded_(block, g, 0.3)
    # Its conditioning encoder keeps PyTorch's default init, whose activations shrink
    # layer by layer until edges barely register: He-normal init keeps them at scale.
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, torch.nn.Conv2d):
            fan_in = conv.weight[0].numel()
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
    scheduler = UniPCMultistepScheduler(**SD15_SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler, controlnet=controlnet)


def ensure_tiny_models(base_dir: str | Path, controlnet_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Build and save the tiny pipeline + ControlNet once; later calls reuse the folders.

    Written to a temporary folder and renamed into place, so a killed build never
    leaves a half-written model that a later run would load.

    :return: (base pipeline folder, controlnet folder), both ``from_pretrained``-loadable.
    """
    base_dir, controlnet_dir = Path(base_dir), Path(controlnet_dir)
    stamp = f"lorafind tiny models v{TINY_MODEL_VERSION} seed {seed}"
    if all(
        (d / "lorafind_tiny.txt").exists() and (d / "lorafind_tiny.txt").read_text() == stamp
        for d in (base_dir, controlnet_dir)
    ):
        return base_dir, controlnet_dir
    c = build_tiny_components(seed)
    for final, save in (
        (base_dir, lambda d: _save_base(c, d)),
        (controlnet_dir, lambda d: c["controlnet"].save_pretrained(d)),
    ):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
        save(tmp)
        (tmp / "lorafind_tiny.txt").write_text(stamp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return base_dir, controlnet_dir


def _save_base(c: dict, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tokenizer = build_clip_tokenizer(folder / "_tok_src")
    pipe = StableDiffusionPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=tokenizer,
        unet=c["unet"],
        scheduler=c["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok_src")


# ---------------------------------------------------------------------------------------------
# Tiny seeded LoRAs in the Civitai/kohya key layout
# ---------------------------------------------------------------------------------------------


def _kohya_targets(unet, text_encoder, locon: bool) -> list[tuple[str, torch.nn.Module]]:
    """Modules a kohya trainer targets: attention/MLP projections (+ resnet convs for LoCon)."""
    targets = []
    for name, m in unet.named_modules():
        in_attn = ".attentions." in f".{name}"
        if (
            in_attn
            and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and ("transformer_blocks" in name or name.endswith(("proj_in", "proj_out")))
        ):
            targets.append(("lora_unet_" + name.replace(".", "_"), m))
        elif (
            locon
            and isinstance(m, torch.nn.Conv2d)
            and (".resnets." in f".{name}")
            and name.endswith(("conv1", "conv2"))
        ):
            targets.append(("lora_unet_" + name.replace(".", "_"), m))
    for name, m in text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            flat = name.replace(".", "_")
            if not flat.startswith("text_model_"):
                flat = "text_model_" + flat
            targets.append(("lora_te_" + flat, m))
    return targets


def make_tiny_lora(unet, text_encoder, spec: dict, twin_base: dict | None = None) -> dict[str, torch.Tensor]:
    """Seeded LoRA weights in kohya layout for the tiny base model.

    :param spec: catalog entry: seed, rank, alpha, strength (size of W' - W relative
        to W), layout (lora | locon); optional twin_of/twin_mix.
    :param twin_base: the state dict of the LoRA this one is a near-twin of; the
        result is ``(1 - mix) * twin + mix * own`` per tensor (before alpha).
    :return: state dict with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
    """
    g = torch.Generator().manual_seed(int(spec["seed"]))
    r = int(spec.get("rank", 4))
    alpha = float(spec.get("alpha", r))
    strength = float(spec["strength"])
    mix = float(spec.get("twin_mix", 1.0))
    sd: dict[str, torch.Tensor] = {}
    for key, m in _kohya_targets(unet, text_encoder, spec.get("layout", "lora") == "locon"):
        w = m.weight.detach()
        if isinstance(m, torch.nn.Linear):
            down = torch.randn(r, m.in_features, generator=g) / math.sqrt(m.in_features)
            up_shape = (m.out_features, r)
        else:
            kh, kw = m.kernel_size
            down = torch.randn(r, m.in_channels, kh, kw, generator=g) / math.sqrt(m.in_channels * kh * kw)
            up_shape = (m.out_channels, r, 1, 1)
        # std(delta W) = (alpha / r) * sqrt(r) * sigma * std(down row . x) ~= strength * std(W)
        s = float(spec.get("te_strength", strength)) if key.startswith("lora_te_") else strength
        sigma = s * float(w.std()) * math.sqrt(w[0].numel()) * r / (alpha * math.sqrt(r))
        up = torch.randn(up_shape, generator=g) * sigma / math.sqrt(w[0].numel())
        if twin_base is not None:
            down = (1 - mix) * twin_base[f"{key}.lora_down.weight"] + mix * down
            up = (1 - mix) * twin_base[f"{key}.lora_up.weight"] + mix * up
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def ensure_tiny_loras(catalog: list[dict], lora_dir: str | Path, base_dir: str | Path) -> list[Path]:
    """Write the tiny profile's seeded LoRA files (once) for every catalog entry.

    :return: the file paths, in catalog order.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    # Only seeded stand-ins are generated; other entries (e.g. LoRAs trained in stage 07) are files.
    catalog = [e for e in catalog if "seed" in e]
    paths = [lora_dir / e["file"] for e in catalog]
    stamp_path = lora_dir / "lorafind_tiny.json"
    stamp = json.dumps({"catalog": catalog, "base": str(Path(base_dir).resolve())}, sort_keys=True)
    if all(p.exists() for p in paths) and stamp_path.exists() and stamp_path.read_text() == stamp:
        return paths
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder")
    made: dict[str, dict] = {}
    for e, p in zip(catalog, paths):
        twin = made.get(e["twin_of"]) if e.get("twin_of") else None
        if e.get("twin_of") and twin is None:
            raise ValueError(f"tiny catalog: '{e['slug']}' is a twin of '{e['twin_of']}', which must come first")
        sd = make_tiny_lora(unet, te, e, twin)
        made[e["slug"]] = sd
        with atomic_path(p) as tmp:
            save_file(sd, str(tmp), metadata={"ss_network_module": "networks.lora", "lorafind_tiny": e["slug"]})
    stamp_path.write_text(stamp)
    return paths


def ensure_tiny_clip(folder, seed: int = 0):
    """A seeded small CLIP (real CLIP BPE tokenizer) saved with ``save_pretrained`` for the offline
    profile -- its scores exercise the code path only (random weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    if (folder / "config.json").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "vocab_size": 49408, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
                     projection_dim=32)
    model = CLIPModel(cfg)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        tokenizer=build_clip_tokenizer(folder / "_tok_src"),
    )
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)
