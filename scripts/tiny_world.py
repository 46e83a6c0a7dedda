"""A miniature SD1.5 world where styles are real: a trained codec, denoiser, ControlNet-Canny and 12 style LoRAs.

The ``tiny`` profile's seeded models (:mod:`lorafind_utils.models.standins`) have random weights, so every
LoRA paints coloured blobs. This module trains small models of the same shape on real photos so
that the study's question ("which LoRA made this image?") has a visible, checkable answer:

* codec: ``AutoencoderKL`` (3 levels, 4x down, 16 latent channels), trained on photos (plus, for a
  quarter of each batch, the 12 styles applied to the ``lora_train`` photos, so that -- like SD's VAE,
  which saw paintings too -- it can represent a pencil line or a halftone dot);
* denoiser: ``UNet2DConditionModel`` trained as an epsilon denoiser on the codec's latents with SD1.5's
  scaled-linear betas and Min-SNR-gamma weighting, conditioned on the tiny CLIP text encoder's embedding of
  the EMPTY prompt (the study restyles with no prompt), weights averaged (diffusers' ``EMAModel``);
* ControlNet-Canny: ``ControlNetModel.from_unet`` (zero convs as diffusers makes them), trained on
  Canny edges of the photos with the UNet frozen;
* 12 LoRAs, one per :data:`lorafind_utils.core.styles.STYLES` entry, trained with the project's own
  :func:`lorafind_utils.models.lora_training.train_lora` as paired restyling adapters (``objective="bridge"``:
  from each ``data/images/lora_train`` photo's img2img start at :data:`STRENGTH` to the photo in that style).

Everything is seeded and resumable (``runs/tiny_world_train/<part>/checkpoint``); the shipped models
live in ``data/tiny_world`` (fp16 safetensors, loaded as float32). ``scripts/train_tiny_world.py``
runs the parts (``--device cuda`` trains on a GPU: batches are drawn on the CPU with the part's seeded
generator and moved, so a part resumes on either device); ``tests/test_tiny_world_train.py`` checks
that a resumed part equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lorafind_utils.core.config import project_root
from lorafind_utils.core.files import atomic_path, write_json_atomic
from lorafind_utils.models.standins import SD15_SCHEDULER

REPO = project_root()
WORLD_DIR = REPO / "data" / "tiny_world"
SD15_DIR = WORLD_DIR / "sd15"
CONTROLNET_DIR = WORLD_DIR / "controlnet-canny"
LORA_DIR = WORLD_DIR / "loras"
CATALOG = WORLD_DIR / "catalog.yaml"
RECORD = WORLD_DIR / "record.json"
PREVIEW = WORLD_DIR / "synthesis_preview.png"
RUN_DIR = REPO / "runs" / "tiny_world_train"
IMAGES = REPO / "data" / "images"

BASE_MODEL = "tiny-world-sd15"
RESOLUTION = 64
#: img2img strength of stage 01 in this world, chosen by :func:`strength_probe` (record.json "strength_probe"): bridge
#: LoRAs trained for 0.3 / 0.5 / 0.7 (pencil, pixel art, pop art, watercolour; 150 steps each) end 3.4 / 2.5 / 1.7 dB
#: nearer the true style than the base model's own output, every style nearest at 0.3, and plain img2img keeps the
#: photo best there (23.9 / 21.4 / 18.6 dB; edge F1 to the control edges 0.74 / 0.72 / 0.67)
STRENGTH = 0.3
STEPS = 10
CANNY = (100, 200)
#: every VAL_EVERY-th variety photo is held out of all training (validation + tests)
VAL_EVERY = 8
TRAIN_SETS = ("variety", "faces", "lora_train")


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=RESOLUTION,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4,
    in_channels=16,
    out_channels=16,
    layers_per_block=1,
    norm_num_groups=8,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
#: the ControlNet's edge encoder: two stride-2 convs, so 64-px edges meet the 16x16 latent
CN_COND_CHANNELS = (16, 32, 64)

#: the parts' default training settings (the script can override steps)
CODEC = dict(steps=3000, batch_size=16, lr=2e-3, styled_share=0.25, kl=1e-6, l1=0.5)
#: denoiser: snr_gamma = Min-SNR-gamma loss weighting (diffusers' compute_snr; 0 = plain epsilon MSE)
DENOISER = dict(steps=7000, batch_size=32, lr=1e-3, ema=0.999, aug=6, snr_gamma=5.0)
CONTROLNET = dict(steps=1500, batch_size=32, lr=5e-4, aug=6, snr_gamma=5.0)
#: LoRA recipe: paired restyling adapters (``objective`` bridge, lora_training.train_lora): each LoRA learns to carry
#: stage 01's img2img start from a lora_train photo (at STRENGTH, STEPS, the frozen ControlNet fed the photo's edges)
#: to that photo in its style. Same rank/steps/lr, unpaired LoRAs (objective standard, Min-SNR gamma ``snr_gamma``)
#: were measured to restyle less (see data/tiny_world/record.json and the README's "tiny world").
#: min_timestep / max_timestep: kohya's window (0 = the scheduler's own bounds; bridge: up to the start step).
LORA = dict(
    rank=8,
    alpha=32,
    steps=400,
    lr=3e-3,
    batch_size=16,
    locon=True,
    snr_gamma=1.0,
    min_timestep=0,
    max_timestep=0,
    objective="bridge",
    controlnet=True,
)
#: steps between a part's checkpoints (a killed part resumes from the last one)
CHECKPOINT_EVERY = 200


# --------------------------------------------------------------------------------------------- photos


def pool(name: str):
    """The photos of ``data/images/<name>`` (read with the project's base-set reader)."""
    from lorafind_utils.core.images import read_base_set

    return read_base_set(IMAGES / name)


def split_base(seed_every: int = VAL_EVERY):
    """(training photos, held-out photos): every set in TRAIN_SETS, less every ``VAL_EVERY``-th variety photo."""
    train, val = [], []
    for name in TRAIN_SETS:
        for i, b in enumerate(pool(name)):
            (val if name == "variety" and i % seed_every == 0 else train).append(b)
    return train, val


def load_square(paths, size: int) -> list[Image.Image]:
    from lorafind_utils.core.images import load_rgb, square_resize

    return [square_resize(load_rgb(p.path if hasattr(p, "path") else p), size) for p in paths]


def to_tensor(ims: list[Image.Image]) -> torch.Tensor:
    """uint8 N x 3 x H x W."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).contiguous()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(im) for im in a]


def random_crops(photos: torch.Tensor, idx: torch.Tensor, g: torch.Generator, out: int = RESOLUTION,
                 min_area: float = 0.4) -> torch.Tensor:
    """Random square crops (area ``min_area``..1 of the photo), resized to ``out``, randomly flipped; float -1..1."""
    n, _, h, w = photos.shape
    res = []
    for i in idx.tolist():
        s = int(round(h * math.sqrt(min_area + (1 - min_area) * float(torch.rand((), generator=g)))))
        y = int(torch.randint(0, h - s + 1, (), generator=g))
        x = int(torch.randint(0, w - s + 1, (), generator=g))
        c = to_unit(photos[i : i + 1, :, y : y + s, x : x + s])
        c = F.interpolate(c, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
        if float(torch.rand((), generator=g)) < 0.5:
            c = c.flip(-1)
        res.append(c)
    return torch.cat(res)


def augmented_bank(photos128: torch.Tensor, plain64: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k versions of every photo as uint8 64-px images: the plain resize (as the pipeline sees it) and k-1 random
    crops."""
    g = torch.Generator().manual_seed(seed)
    out = [plain64]
    for _ in range(k - 1):
        c = random_crops(photos128, torch.arange(len(photos128)), g)
        out.append(((c + 1) * 127.5).round().clamp(0, 255).byte())
    return torch.cat(out)


def styled_images(ims: list[Image.Image]) -> dict[str, list[Image.Image]]:
    """Every style applied to every image: {LoRA slug: [styled images]}."""
    from lorafind_utils.core.styles import STYLES

    cv2.setNumThreads(1)
    return {s.lora: [s.fn(im) for im in ims] for s in STYLES.values()}


def canny(im: Image.Image | np.ndarray, low: int = CANNY[0], high: int = CANNY[1]) -> np.ndarray:
    """Stage 01's control edges (:func:`lorafind_utils.core.images.canny_edges`, thresholds 100/200) as a bool map."""
    from lorafind_utils.core.images import canny_edges

    return canny_edges(im, low, high)


def control_image(im: Image.Image) -> Image.Image:
    """The control image stage 01 feeds the pipeline (:func:`lorafind_utils.models.restyle.canny_image`)."""
    from lorafind_utils.models.restyle import canny_image

    return canny_image(im, *CANNY)


def control_tensor(bank_u8: torch.Tensor) -> torch.Tensor:
    """Canny maps of a uint8 bank as the pipeline feeds them to the ControlNet: 3 x H x W floats in 0..1."""
    from lorafind_utils.core.images import control_maps

    return control_maps(bank_u8, *CANNY)


# --------------------------------------------------------------------------------------------- models


def build_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    from lorafind_utils.models.standins import TEXT_CONFIG

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()


def build_tokenizer(folder: Path):
    from lorafind_utils.models.standins import build_clip_tokenizer

    return build_clip_tokenizer(folder)


@torch.no_grad()
def empty_prompt_embedding(text_encoder, tokenizer) -> torch.Tensor:
    """1 x 77 x 32: what the pipeline feeds the UNet for prompt "" (padding to max length, last hidden state)."""
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0].float()


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULER)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _cast(key: str, value, default):
    """``value`` as the type of ``default``: "false" for a bool, "40000" or "4e4" for an int, "5e-4" for a float."""
    if isinstance(default, str):
        from lorafind_utils.models.lora_training import OBJECTIVES

        choices = {"objective": OBJECTIVES}.get(key)
        if choices and value not in choices:
            raise ValueError(f"setting {key!r}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)
    if isinstance(default, bool):
        if not isinstance(value, str):
            return bool(value)
        if value.lower() not in _BOOLS:
            raise ValueError(f"setting {key!r}: expected one of {', '.join(_BOOLS)}, got {value!r}")
        return _BOOLS[value.lower()]
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {key!r}: expected a number, got {value!r}") from None
    if isinstance(default, int) and not f.is_integer():
        raise ValueError(f"setting {key!r}: expected a whole number, got {value!r}")
    return type(default)(f)


def _settings(defaults: dict, overrides: dict | None, steps: int | None) -> dict:
    """A part's settings: its defaults, then ``overrides`` (known keys only, cast to the default's type;
    strings as a command line gives them: "40000", "5e-4", "false"), then ``steps`` when given."""
    p = dict(defaults)
    for k, v in (overrides or {}).items():
        if k not in defaults:
            raise ValueError(f"unknown setting {k!r}; known: {', '.join(sorted(defaults))}")
        p[k] = _cast(k, v, defaults[k])
    if steps is not None:
        p["steps"] = int(steps)
    return p


def save_fp16(model, folder: Path) -> None:
    """``save_pretrained`` with fp16 weights; the config says float32 so every loader upcasts on load."""
    import copy

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    m = copy.deepcopy(model).to(torch.float16)
    m.save_pretrained(folder)
    cfg = folder / "config.json"
    c = json.loads(cfg.read_text())
    for k in ("dtype", "torch_dtype"):
        if k in c:
            c[k] = "float32"
    cfg.write_text(json.dumps(c, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A part's resumable state: module weights (safetensors), optimizer, generator, step, history, seconds."""

    def __init__(self, folder: Path, signature: dict):
        self.dir = Path(folder) / "checkpoint"
        self.sig = signature

    def load(self, modules: dict, opt, g: torch.Generator) -> tuple[int, list, float]:
        from safetensors.torch import load_file

        state_f = self.dir / "state.json"
        if not state_f.exists():
            return 0, [], 0.0
        state = json.loads(state_f.read_text())
        if state["signature"] != self.sig:
            diff = sorted(
                k for k in set(state["signature"]) | set(self.sig) if state["signature"].get(k) != self.sig.get(k)
            )
            raise ValueError(
                f"{self.dir} belongs to another run (differs in {', '.join(diff)}); delete it to start over"
            )
        for name, m in modules.items():
            m.load_state_dict(load_file(str(self.dir / f"{name}.safetensors")))
        opt.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True))
        g.set_state(torch.load(self.dir / "generator.pt", weights_only=True))
        return int(state["step"]), state["history"], float(state["seconds"])

    def save(self, step: int, modules: dict, opt, g: torch.Generator, history: list, seconds: float) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        for name, m in modules.items():
            with atomic_path(self.dir / f"{name}.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp))
        with atomic_path(self.dir / "optimizer.pt") as tmp:
            torch.save(opt.state_dict(), tmp)
        with atomic_path(self.dir / "generator.pt") as tmp:
            torch.save(g.get_state(), tmp)
        write_json_atomic(
            {"step": step, "signature": self.sig, "history": history, "seconds": seconds}, self.dir / "state.json"
        )


def train_loop(name: str, folder: Path, signature: dict, modules: dict, params: list, steps: int, lr: float, seed: int,
               step_fn, checkpoint_every: int | None = None, progress: bool = True, ema: dict | None = None,
               weight_decay: float = 1e-2, stop_after: int | None = None, warmup: int = 100) -> dict:
    """The shared resumable loop: ``step_fn(g) -> loss``; AdamW with diffusers' ``get_scheduler("cosine")``
    (linear warm-up, cosine decay); optional EMA with diffusers' ``EMAModel``.

    :param modules: weights to checkpoint ({name: module}); ``ema`` = {"decay": d, "src": module, "dst": module}
        keeps ``dst`` as the exponential moving average of ``src`` (EMAModel's warm-up decay
        ``min(d, (1 + step) / (10 + step))``; copied into ``dst``, which is checkpointed via ``modules``).
    :return: {"history", "seconds", "steps"}.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    checkpoint_every = checkpoint_every or CHECKPOINT_EVERY
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ck = Checkpoint(folder, signature)
    start, history, seconds = ck.load(modules, opt, g)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=min(warmup, steps // 10), num_training_steps=steps)
    if start:  # the schedule is a pure function of the step: on resume, set it where the killed run left it
        lr_sched.last_epoch = start
        for group, base, f in zip(opt.param_groups, lr_sched.base_lrs, lr_sched.lr_lambdas):
            group["lr"] = base * f(start)
    averaged = None
    if ema is not None:
        averaged = EMAModel(ema["dst"].parameters(), decay=ema["decay"])
        averaged.optimization_step = start

    def save(step: int) -> None:
        if averaged is not None:
            averaged.copy_to(ema["dst"].parameters())
        ck.save(step, modules, opt, g, history, seconds + time.perf_counter() - t0)

    bar = tqdm(range(start, steps), desc=name, unit="step", initial=start, total=steps, disable=not progress)
    t0 = time.perf_counter()
    done = 0
    for step in bar:
        loss = step_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        if averaged is not None:
            averaged.step(ema["src"].parameters())
        history.append(round(float(loss.detach()), 5))
        done += 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    if averaged is not None:
        averaged.copy_to(ema["dst"].parameters())
    return {"history": history, "seconds": seconds + time.perf_counter() - t0, "steps": len(history)}


# --------------------------------------------------------------------------------------------- metrics


def psnr(a, b) -> float:
    """PSNR in dB between uint8 images (PIL or arrays), averaged over pairs when given lists."""
    if isinstance(a, (list, tuple)):
        return float(np.mean([psnr(x, y) for x, y in zip(a, b)]))
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    mse = float(((x - y) ** 2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def edge_f1(output, control_edges: np.ndarray, tol: int = 1) -> float:
    """F1 between Canny(output) and the control edges, each counted as matched within ``tol`` px (dilation)."""
    e = canny(output)
    c = control_edges
    k = np.ones((2 * tol + 1, 2 * tol + 1), np.uint8)
    cd = cv2.dilate(c.astype(np.uint8), k) > 0
    ed = cv2.dilate(e.astype(np.uint8), k) > 0
    if e.sum() == 0 or c.sum() == 0:
        return 0.0
    precision = float((e & cd).sum() / e.sum())
    recall = float((c & ed).sum() / c.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def style_features(a) -> np.ndarray:
    """:func:`lorafind_utils.core.style_features.style_features` with the colour moments."""
    from lorafind_utils.core.style_features import style_features as features

    return features(a, colour_moments=True)


def recognition(outputs: dict[str, list], truths: dict[str, list], plain: list) -> dict:
    """How often each LoRA's output is closest to its own style, on the same photo.

    :param outputs: {slug: [LoRA output per photo]}; truths: {slug: [the style applied to the photo]};
        plain: [the pipeline's output without a LoRA] (the 13th candidate, "no style").
    :return: {"per_style": {slug: rate}, "mean": m, "centroid_per_style": {...}, "centroid_mean": m,
        "confusion": {slug: {predicted: count}}}. Features are scaled by the true styles' pooled spread.
    """
    slugs = list(truths)
    n = len(plain)
    T = np.array([[style_features(np.asarray(truths[s][p])) for s in slugs] + [style_features(np.asarray(plain[p]))]
                  for p in range(n)])  # photo x (12 + 1) x feat
    mu = T.reshape(-1, T.shape[-1]).mean(0)
    sd = np.sqrt(T[:, :-1].var(axis=0).mean(0)) + 1e-3
    Tz = (T - mu) / sd
    cent = Tz.mean(0)
    per, cper, conf = {}, {}, {}
    for k, s in enumerate(slugs):
        out_f = (np.array([style_features(np.asarray(o)) for o in outputs[s]]) - mu) / sd
        pred = ((out_f[:, None] - Tz) ** 2).sum(-1).argmin(1)
        cpred = ((out_f[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
        per[s] = float((pred == k).mean())
        cper[s] = float((cpred == k).mean())
        names = slugs + ["(no style)"]
        conf[s] = {names[j]: int((pred == j).sum()) for j in sorted(set(pred.tolist()))}
    return {"per_style": per, "mean": float(np.mean(list(per.values()))), "centroid_per_style": cper,
            "centroid_mean": float(np.mean(list(cper.values()))), "confusion": conf}


def separability(outputs: dict[str, list]) -> dict:
    """Can the LoRAs' outputs be told apart (what the study's classifier needs)? Leave-one-photo-out nearest
    centroid on :func:`style_features` of the outputs themselves: {"per_style": {slug: rate}, "mean": m}."""
    slugs = list(outputs)
    n = len(outputs[slugs[0]])
    X = np.array([[style_features(np.asarray(outputs[s][p])) for s in slugs] for p in range(n)])
    hits = np.zeros(len(slugs))
    for p in range(n):
        train = np.delete(X, p, axis=0)
        mu = train.reshape(-1, X.shape[-1]).mean(0)
        sd = np.sqrt(train.var(axis=0).mean(0)) + 1e-3
        cent = ((train - mu) / sd).mean(0)
        q = (X[p] - mu) / sd
        hits += ((q[:, None] - cent[None]) ** 2).sum(-1).argmin(1) == np.arange(len(slugs))
    per = {s: float(h / n) for s, h in zip(slugs, hits)}
    return {"per_style": per, "mean": float(np.mean(list(per.values())))}


# --------------------------------------------------------------------------------------------- pipeline


def load_world_pipeline(world_dir: Path | None = None, device: str = "cpu"):
    """The world's SD1.5 ControlNet img2img pipeline, loaded exactly as ``models.load_pipeline`` loads one."""
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    from lorafind_utils.models.pipelines import SCHEDULER, quiet_libraries

    quiet_libraries()
    world_dir = Path(world_dir or WORLD_DIR)
    controlnet = ControlNetModel.from_pretrained(world_dir / "controlnet-canny", dtype=torch.float32)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        world_dir / "sd15",
        controlnet=controlnet,
        dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = getattr(diffusers, SCHEDULER).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def restyle(pipe, images: list[Image.Image], seeds: list[int], strength: float = STRENGTH, steps: int = STEPS,
            controlnet_scale: float = 1.0, batch_size: int = 32) -> list[Image.Image]:
    """Stage 01's call: empty prompt, guidance 1, Canny control, one CPU generator per image."""
    out = []
    for i in range(0, len(images), batch_size):
        ims = images[i : i + batch_size]
        res = pipe(
            prompt=[""] * len(ims),
            image=ims,
            control_image=[control_image(im) for im in ims],
            strength=float(strength),
            num_inference_steps=int(steps),
            controlnet_conditioning_scale=float(controlnet_scale),
            guidance_scale=1.0,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]],
            output_type="pil",
        )
        out += res.images
    return out


def sha256(path: Path) -> str:
    """SHA-256 (hex) of a file: the project's one hash of a file (:func:`lorafind_utils.core.files.sha256_file`)."""
    from lorafind_utils.core.files import sha256_file

    return sha256_file(path)


def phash(im: Image.Image) -> np.ndarray:
    """64-bit DCT perceptual hash (as scripts/build_photo_pools.py computes it)."""
    g = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float32)
    d = cv2.dct(g)[:8, :8]
    return (d > np.median(d)).flatten()


# --------------------------------------------------------------------------------------------- parts


def _data(seed: int):
    """Training photos at 128 px (crops) and 64 px (plain), held-out photos at 64 px, lora_train ids."""
    train, val = split_base()
    p128 = to_tensor(load_square(train, 128))
    p64 = to_tensor(load_square(train, RESOLUTION))
    v64 = load_square(val, RESOLUTION)
    return train, val, p128, p64, v64


def lora_train_images() -> list[Image.Image]:
    return load_square(pool("lora_train"), RESOLUTION)


def styled_bank(cache: Path) -> dict[str, torch.Tensor]:
    """The 12 styles applied to the 64-px lora_train photos (uint8 tensors), cached as one file."""
    f = Path(cache) / "styled_lora_train.pt"
    if f.exists():
        return torch.load(f, weights_only=True)
    st = {k: to_tensor(v) for k, v in styled_images(lora_train_images()).items()}
    f.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(f) as tmp:
        torch.save(st, tmp)
    return st


@torch.no_grad()
def vae_roundtrip(vae, ims: list[Image.Image]) -> list[Image.Image]:
    x = to_unit(to_tensor(ims)).to(next(vae.parameters()).device)
    return to_pil(vae.decode(vae.encode(x).latent_dist.mode()).sample.cpu())


def train_codec(seed: int = 0, steps: int | None = None, progress: bool = True, stop_after: int | None = None,
                device: str = "cpu", settings: dict | None = None) -> dict:
    """Train the codec (resumable); ``settings`` overrides :data:`CODEC` (e.g. ``{"batch_size": 64}``)."""
    p = _settings(CODEC, settings, steps)
    folder = RUN_DIR / "codec"
    train, val, p128, p64, v64 = _data(seed)
    vae = build_vae(seed).to(device)
    n_styled = int(round(p["batch_size"] * p["styled_share"]))
    n_photo = p["batch_size"] - n_styled
    styled = torch.cat(list(styled_bank(RUN_DIR).values())) if n_styled else None

    def step_fn(g):
        idx = torch.randint(0, len(p128), (n_photo,), generator=g)
        x = random_crops(p128, idx, g)
        if n_styled:
            j = torch.randint(0, len(styled), (n_styled,), generator=g)
            xs = to_unit(styled[j])
            flip = torch.rand(n_styled, generator=g) < 0.5
            xs[flip] = xs[flip].flip(-1)
            x = torch.cat([x, xs])
        x = x.to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        return F.mse_loss(rec, x) + p["l1"] * F.l1_loss(rec, x) + p["kl"] * kl

    sig = {"part": "codec", "seed": seed, **{k: v for k, v in p.items()}, "config": json.loads(json.dumps(VAE_CONFIG)),
           "n_train": len(train)}
    vae.train()
    r = train_loop("codec", folder, sig, {"vae": vae}, list(vae.parameters()), p["steps"], p["lr"], seed, step_fn,
                   progress=progress, weight_decay=0.0, stop_after=stop_after)
    if r["steps"] < p["steps"]:
        return r
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(to_unit(p64[i : i + 64]).to(device)).latent_dist.mode() for i in range(0, len(p64), 64)]
        )
    std = float(lat.std())
    vae = vae.cpu()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    val_psnr = psnr([np.asarray(x) for x in vae_roundtrip(vae, v64)], [np.asarray(x) for x in v64])
    styled_val = {k: psnr([np.asarray(x) for x in vae_roundtrip(vae, v)], [np.asarray(x) for x in v])
                  for k, v in styled_images(v64).items()}
    (folder / "final").mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "final")
    res = {
        "steps": p["steps"],
        "seconds": r["seconds"],
        "params": n_params(vae),
        "latent_std": std,
        "scaling_factor": vae.config.scaling_factor,
        "val_psnr": val_psnr,
        "val_psnr_styled": styled_val,
        "n_val": len(v64),
        "loss_first50": float(np.mean(r["history"][:50])),
        "loss_last50": float(np.mean(r["history"][-50:])),
        "settings": p,
    }
    write_json_atomic(res, folder / "result.json")
    return res


@torch.no_grad()
def encode_bank(vae, bank_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std (times the codec's scaling factor) of a uint8 bank, as train_lora encodes."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for i in range(0, len(bank_u8), 64):
        d = vae.encode(to_unit(bank_u8[i : i + 64]).to(device)).latent_dist
        means.append(d.mean * vae.config.scaling_factor)
        stds.append(d.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def snr_weighted_mse(pred: torch.Tensor, target: torch.Tensor, sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Epsilon MSE, each sample weighted by Min-SNR-gamma (:func:`lorafind_utils.models.lora_training.min_snr_weights`,
    diffusers' ``compute_snr``); ``gamma`` 0 = plain MSE."""
    if not gamma:
        return F.mse_loss(pred, target)
    from lorafind_utils.models.lora_training import min_snr_weights

    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(sched, t, gamma)).mean()


def _noisy(sched, mean, std, idx, g):
    """Noised latents for rows ``idx`` of a latent bank; the randomness comes from the CPU generator ``g``
    (the same draws on every device), the tensors live where the bank lives."""
    dev = mean.device
    lat = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(dev)
    noise = torch.randn(lat.shape, generator=g).to(dev)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g).to(dev)
    return sched.add_noise(lat, noise, t), noise, t


def train_denoiser(seed: int = 0, steps: int | None = None, progress: bool = True, stop_after: int | None = None,
                   device: str = "cpu", settings: dict | None = None) -> dict:
    """Train the denoiser (resumable) and ship the base pipeline; ``settings`` overrides :data:`DENOISER`."""
    import copy

    from diffusers import AutoencoderKL

    p = _settings(DENOISER, settings, steps)
    folder = RUN_DIR / "denoiser"
    vae = AutoencoderKL.from_pretrained(RUN_DIR / "codec" / "final").eval().to(device)
    train, val, p128, p64, v64 = _data(seed)
    bank = augmented_bank(p128, p64, p["aug"], seed + 1)
    mean, std = encode_bank(vae, bank)
    te = build_text_encoder(seed)
    tok = build_tokenizer(RUN_DIR / "tokenizer")
    text = empty_prompt_embedding(te, tok).to(device)
    unet = build_unet(seed).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = ddpm()
    bs = p["batch_size"]

    def step_fn(g):
        idx = torch.randint(0, len(mean), (bs,), generator=g)
        noisy, noise, t = _noisy(sched, mean, std, idx, g)
        pred = unet(noisy, t, text.expand(bs, -1, -1)).sample
        return snr_weighted_mse(pred, noise, sched, t, p["snr_gamma"])

    sig = {"part": "denoiser", "seed": seed, **p, "config": json.loads(json.dumps(UNET_CONFIG)), "n_bank": len(bank),
           "vae_sf": vae.config.scaling_factor}
    unet.train()
    r = train_loop(
        "denoiser",
        folder,
        sig,
        {"unet": unet, "ema": ema},
        list(unet.parameters()),
        p["steps"],
        p["lr"],
        seed,
        step_fn,
        progress=progress,
        ema={"decay": p["ema"], "src": unet, "dst": ema},
        stop_after=stop_after,
    )
    if r["steps"] < p["steps"]:
        return r
    ship_base(vae.cpu(), ema.eval().cpu(), te, tok)
    res = {"steps": p["steps"], "seconds": r["seconds"], "params": n_params(ema), "text_encoder_params": n_params(te),
           "loss_first50": float(np.mean(r["history"][:50])), "loss_last200": float(np.mean(r["history"][-200:])),
           "n_bank": len(bank), "settings": p}
    write_json_atomic(res, folder / "result.json")
    return res


def ship_base(vae, unet, te, tok, folder: Path | None = None) -> None:
    """Write the ``save_pretrained`` pipeline folder (fp16 weights, UniPC scheduler with SD1.5 betas)."""
    import copy

    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    folder = Path(folder or SD15_DIR)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(te).half(), tokenizer=tok,
                                   unet=copy.deepcopy(unet).half(), scheduler=UniPCMultistepScheduler(**SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    # the slow-tokenizer files (vocab.json + merges.txt, 1.5 MB) instead of tokenizer.json (3.6 MB): same ids
    src = build_tokenizer(tmp / "_tok_src") and tmp / "_tok_src"
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp / "tokenizer" / name)
    shutil.rmtree(src)
    cfg = tmp / "text_encoder" / "config.json"
    c = json.loads(cfg.read_text())
    c["dtype"] = "float32"  # transformers 5 loads "auto" = the config's dtype: upcast on load
    cfg.write_text(json.dumps(c, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_base_parts(folder: Path | None = None):
    folder = folder or SD15_DIR
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return vae, unet, te, tok


def train_controlnet(seed: int = 0, steps: int | None = None, progress: bool = True, stop_after: int | None = None,
                     device: str = "cpu", settings: dict | None = None) -> dict:
    """Train the ControlNet-Canny (resumable) with the shipped UNet frozen; ``settings`` overrides
    :data:`CONTROLNET`."""
    from diffusers import ControlNetModel

    p = _settings(CONTROLNET, settings, steps)
    folder = RUN_DIR / "controlnet"
    vae, unet, te, tok = load_base_parts()
    vae, unet = vae.to(device), unet.to(device)
    unet.requires_grad_(False)
    text = empty_prompt_embedding(te, tok).to(device)
    train, val, p128, p64, v64 = _data(seed)
    bank = augmented_bank(p128, p64, p["aug"], seed + 2)
    mean, std = encode_bank(vae, bank)
    cond = control_tensor(bank).to(device)
    torch.manual_seed(seed + 3)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CN_COND_CHANNELS).to(device)
    sched = ddpm()
    bs = p["batch_size"]

    def step_fn(g):
        idx = torch.randint(0, len(mean), (bs,), generator=g)
        noisy, noise, t = _noisy(sched, mean, std, idx, g)
        tb = text.expand(bs, -1, -1)
        down, mid = cn(noisy, t, encoder_hidden_states=tb, controlnet_cond=cond[idx], return_dict=False)
        pred = unet(noisy, t, tb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return snr_weighted_mse(pred, noise, sched, t, p["snr_gamma"])

    sig = {"part": "controlnet", "seed": seed, **p, "cond_channels": list(CN_COND_CHANNELS), "n_bank": len(bank),
           "base_unet": sha256(next((SD15_DIR / "unet").glob("*.safetensors")))}
    cn.train()
    r = train_loop(
        "controlnet",
        folder,
        sig,
        {"controlnet": cn},
        list(cn.parameters()),
        p["steps"],
        p["lr"],
        seed,
        step_fn,
        progress=progress,
        stop_after=stop_after,
    )
    if r["steps"] < p["steps"]:
        return r
    save_fp16(cn.eval().cpu(), CONTROLNET_DIR)
    res = {
        "steps": p["steps"],
        "seconds": r["seconds"],
        "params": n_params(cn),
        "loss_first50": float(np.mean(r["history"][:50])),
        "loss_last200": float(np.mean(r["history"][-200:])),
        "settings": p,
    }
    write_json_atomic(res, folder / "result.json")
    return res


def lora_items(slug: str):
    """The style's LoRA training set: the style applied to every 64-px lora_train photo, plus mirrored copies;
    empty captions, as the study restyles with the empty prompt."""
    from lorafind_utils.models.lora_training import StyleImage

    ids = [b.id for b in pool("lora_train")]
    ims = to_pil(to_unit(styled_bank(RUN_DIR)[slug]))
    photos = lora_train_images()
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    items = [StyleImage(f"{i}.png", "", im, src) for i, im, src in zip(ids, ims, photos)]
    items += [
        StyleImage(f"{i}_mirror.png", "", im.transpose(flip), src.transpose(flip))
        for i, im, src in zip(ids, ims, photos)
    ]
    return items


def train_loras(seed: int = 0, slugs: list[str] | None = None, progress: bool = True, settings: dict | None = None,
                device: str = "cpu", run_dir: Path | None = None, out_dir: Path | None = None,
                strength: float | None = None) -> dict:
    """Train the style LoRAs (resumable, under ``run_dir``, default ``RUN_DIR/loras``) and write fp16 kohya files
    to ``out_dir`` (default ``LORA_DIR``); ``settings`` overrides :data:`LORA`; ``strength`` (default
    :data:`STRENGTH`) is the img2img strength a bridge LoRA is trained for."""
    strength = STRENGTH if strength is None else float(strength)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorafind_utils.core.styles import STYLES
    from lorafind_utils.models.lora_training import LOCON_MODULES, train_lora

    p = _settings(LORA, settings, None)
    out = {}
    for k, st in enumerate(STYLES.values()):
        if slugs and st.lora not in slugs:
            continue
        folder = Path(run_dir or RUN_DIR / "loras") / st.lora
        t0 = time.perf_counter()
        res = train_lora(
            str(SD15_DIR),
            lora_items(st.lora),
            folder,
            int(p["rank"]),
            alpha=float(p["alpha"]),
            steps=int(p["steps"]),
            lr=float(p["lr"]),
            batch_size=int(p["batch_size"]),
            seed=seed * 1000 + k,
            checkpoint_every=100,
            progress=progress,
            target_modules=LOCON_MODULES if p["locon"] else None,
            max_timestep=p["max_timestep"] or None,
            min_timestep=p["min_timestep"] or None,
            snr_gamma=(p["snr_gamma"] or None) if p["objective"] == "standard" else None,
            device=device,
            objective=p["objective"],
            controlnet=str(CONTROLNET_DIR) if p["controlnet"] else None,
            strength=strength,
            infer_steps=STEPS,
            canny=CANNY,
        )
        kohya = Path(res["kohya"])
        with safe_open(str(kohya), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {key: (f.get_tensor(key) if key.endswith(".alpha") else f.get_tensor(key).half()) for key in f.keys()}
        lora_dir = Path(out_dir or LORA_DIR)
        lora_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(lora_dir / f"{st.lora}.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={**meta, "lorafind_tiny_world": st.lora, "style": st.name})
        hist = [h["loss"] for h in res["history"]]
        out[st.lora] = {
            "style": st.name,
            "rank": int(p["rank"]),
            "alpha": float(p["alpha"]),
            "steps": int(p["steps"]),
            "layout": "locon" if p["locon"] else "lora",
            "lr": float(p["lr"]),
            "batch_size": int(p["batch_size"]),
            "objective": p["objective"],
            "controlnet": bool(p["controlnet"]),
            "strength": strength,
            "snr_gamma": p["snr_gamma"],
            "min_timestep": p["min_timestep"],
            "max_timestep": p["max_timestep"],
            "train_seconds": res["train_seconds"],
            "wall_seconds": time.perf_counter() - t0,
            "loss_first50": float(np.mean(hist[:50])),
            "loss_last100": float(np.mean(hist[-100:])),
            "n_items": len(res["train_images"]),
        }
        write_json_atomic(out[st.lora], folder / "result.json")
    return out


def write_catalog(results: dict) -> Path:
    import yaml

    from lorafind_utils.core.styles import STYLES

    entries = []
    for st in STYLES.values():
        r = results[st.lora]
        f = LORA_DIR / f"{st.lora}.safetensors"
        entries.append({"slug": st.lora, "short": st.short, "file": f"{st.lora}.safetensors", "sha256": sha256(f),
                        "layout": r["layout"], "style": st.name, "rank": r["rank"], "alpha": r["alpha"]})
    head = (
        "# Tiny world: 12 LoRAs TRAINED (lora_training.train_lora, stage 07's trainer) on the tiny-world SD1.5\n"
        "# (data/tiny_world/sd15), one per named style of lorafind_utils.core.styles applied to\n"
        "# data/images/lora_train;\n"
        "# named after the paper's Table 1 so tables line up. They are NOT the real LoRAs.\n"
        "# layout: lora (attention projections) or locon (+ resnet conv1/conv2). Made by scripts/train_tiny_world.py.\n"
    )
    with atomic_path(CATALOG) as tmp:
        tmp.write_text(head + yaml.safe_dump({"base_model": BASE_MODEL, "loras": entries}, sort_keys=False, width=200))
    return CATALOG


def item_seed(seed: int, lora: str, image_id: str) -> int:
    """Stage 01's per-image seed (the formula of synthesis.item_seed)."""
    h = hashlib.sha256(f"{seed}|{lora}|{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------- evaluation


def heldout_images(n: int | None = None) -> tuple[list[str], list[Image.Image]]:
    """The held-out variety photos (never trained on) at the world's resolution: (ids, images)."""
    _, val = split_base()
    val = val[:n] if n else val
    return [b.id for b in val], load_square(val, RESOLUTION)


def restyle_with(pipe, path: Path | None, slug: str, ids: list[str], ims: list[Image.Image], strength: float,
                 controlnet_scale: float = 1.0, seed: int = 0) -> list[Image.Image]:
    """Restyle ``ims`` with one LoRA at weight 1.0 (loaded via loras.load_lora, then unloaded) or none (path None)."""
    from lorafind_utils.models.loras import load_lora

    seeds = [item_seed(seed, slug, i) for i in ids]
    if path is None:
        return restyle(pipe, ims, seeds, strength, controlnet_scale=controlnet_scale)
    load_lora(pipe, path, slug, weight=1.0)
    try:
        return restyle(pipe, ims, seeds, strength, controlnet_scale=controlnet_scale)
    finally:
        pipe.unload_lora_weights()


def retrieval_probe(pipe, loras: dict[str, Path], strength: float, n_train: int = 60, seed: int = 0) -> dict:
    """What Table 3 can reach in this world, cheaply: each LoRA restyles ``n_train`` variety photos; a linear
    probe (logistic regression on the ImageNet EfficientNet-Lite0 features stage 02 starts from) learns which
    LoRA made an image; it then ranks the LoRAs for (a) style samples -- the ``queries`` photos (never
    trained on) in each LoRA's true style -- and (b) the LoRAs' own restyles of the held-out photos.

    :param loras: {slug: LoRA file}, slugs of :data:`lorafind_utils.core.styles.STYLES`.
    :return: {"style_samples": {top1, top3, mrr, per_style}, "own_generations": {...}, "chance": {...}}.
    """
    from sklearn.linear_model import LogisticRegression

    from lorafind_utils.core.styles import get_style
    from lorafind_utils.models.classifier import build_model, features
    from lorafind_utils.rank.classifier_ranker import retrieval_metrics

    slugs = list(loras)
    photos = pool("variety")[:n_train]
    ims, ids = load_square(photos, RESOLUTION), [b.id for b in photos]
    net = build_model(len(slugs), weights="imagenet", backbone="efficientnet_lite0")

    def feats(images):
        return features(net, to_tensor(images)).numpy()

    X = np.concatenate([feats(restyle_with(pipe, loras[s], s, ids, ims, strength, seed=seed)) for s in slugs])
    y = np.repeat(np.arange(len(slugs)), len(ims))
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(X, y)

    def scores(Xq, yq):
        P = clf.predict_proba(Xq)
        ranks = 1 + (P > P[np.arange(len(yq)), yq][:, None]).sum(1)  # 1-based rank of the true LoRA
        m = retrieval_metrics(ranks)
        return {"top1": m["top1"], "top3": m["top3"], "mrr": m["mrr"], "n": m["queries"],
                "per_style": {s: float((ranks[yq == k] == 1).mean()) for k, s in enumerate(slugs)}}

    q = load_square(pool("queries"), RESOLUTION)
    Xs = np.concatenate([feats([get_style(s).fn(im) for im in q]) for s in slugs])
    hid, him = heldout_images()
    Xo = np.concatenate([feats(restyle_with(pipe, loras[s], s, [f"probe_{i}" for i in hid], him, strength, seed=seed))
                         for s in slugs])
    k = len(slugs)
    return {"strength": strength, "n_train": len(ims), "style_samples": scores(Xs, np.repeat(np.arange(k), len(q))),
            "own_generations": scores(Xo, np.repeat(np.arange(k), len(him))),
            "chance": {"top1": 1 / k, "top3": min(3, k) / k, "mrr": retrieval_metrics([1], k)["chance_mrr"]}}


def throughput(pipe, lora: Path | None, strength: float, n: int = 32, repeats: int = 2) -> float:
    """Stage 01's speed: images/s for batches of 32, 10 steps, ControlNet on, current torch threads."""
    from lorafind_utils.models.loras import load_lora

    ids, ims = heldout_images()
    ims = (ims * (n // len(ims) + 1))[:n]
    if lora is not None:
        load_lora(pipe, lora, "speed", weight=1.0)
    try:
        restyle(pipe, ims[:4], list(range(4)), strength)  # warm-up
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            restyle(pipe, ims, list(range(n)), strength)
            best = max(best, n / (time.perf_counter() - t))
        return best
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


def grid(rows: list[list[Image.Image]], labels: list[str], cell: int = RESOLUTION, label_w: int = 112) -> Image.Image:
    from PIL import ImageDraw

    g = Image.new("RGB", (label_w + cell * len(rows[0]), cell * len(rows)), "white")
    d = ImageDraw.Draw(g)
    for r, (row, lab) in enumerate(zip(rows, labels)):
        d.text((3, r * cell + cell // 2 - 6), lab, fill="black")
        for c, im in enumerate(row):
            g.paste(im.resize((cell, cell)), (label_w + c * cell, r * cell))
    return g


def evaluate(seed: int = 0, strengths: tuple = (), strength: float | None = None, progress: bool = True,
             device: str = "cpu", probe: bool = False) -> dict:
    """Every figure of record.json's "evaluation": codec PSNR, img2img PSNR, edge agreement with/without ControlNet,
    per-style recognition at the world's strength (and any other ``strengths``: the LoRAs are trained for one
    strength, so the choice of strength is :func:`strength_probe`'s), stage-01 throughput, the retrieval probe;
    writes the preview grid and the codec's round-trip grid. ``probe``: also :func:`retrieval_probe`."""
    from lorafind_utils.core.styles import STYLES

    strength = STRENGTH if strength is None else float(strength)
    strengths = tuple(sorted(set(strengths) | {strength}))
    pipe = load_world_pipeline(device=device)
    ids, ims = heldout_images()
    arr = [np.asarray(x) for x in ims]
    res: dict = {"n_heldout": len(ims), "heldout": ids}
    res["vae_psnr"] = psnr([np.asarray(x) for x in vae_roundtrip(pipe.vae, ims)], arr)
    truths = {k: v for k, v in styled_images(ims).items()}
    cols = list(range(6))
    rt_rows, rt_labels = [ims[:6], vae_roundtrip(pipe.vae, ims[:6])], ["photo", "codec round trip"]
    for slug in ("anime", "liuli", "pop_art", "pixel_art", "xsarchitecture"):
        rt_rows += [truths[slug][:6], vae_roundtrip(pipe.vae, truths[slug][:6])]
        rt_labels += [slug, "codec round trip"]
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    grid(rt_rows, rt_labels).save(RUN_DIR / "codec_roundtrip.png")
    res["vae_psnr_styled"] = {k: psnr([np.asarray(x) for x in vae_roundtrip(pipe.vae, v)], [np.asarray(x) for x in v])
                              for k, v in truths.items()}
    noise = [np.random.default_rng(i).integers(0, 256, a.shape, dtype=np.uint8) for i, a in enumerate(arr)]
    res["noise_psnr"] = psnr(noise, arr)
    edges = [canny(x) for x in ims]
    res["edge_f1"], res["img2img_psnr"] = {}, {}
    for s in sorted(set([0.3, 0.5, 0.7, strength, 1.0])):
        for scale in (1.0, 0.0):
            out = restyle_with(pipe, None, "none", ids, ims, s, controlnet_scale=scale, seed=seed)
            res["edge_f1"][f"strength {s} controlnet {scale}"] = float(
                np.mean([edge_f1(o, e) for o, e in zip(out, edges)])
            )
            res["img2img_psnr"][f"strength {s} controlnet {scale}"] = psnr([np.asarray(o) for o in out], arr)
    sweep = {}
    outs_at = {}
    bar = tqdm(total=len(strengths) * (len(STYLES) + 1), desc="evaluating", disable=not progress)
    for s in strengths:
        plain = restyle_with(pipe, None, "none", ids, ims, s, seed=seed)
        bar.update()
        outs = {}
        for st in STYLES.values():
            outs[st.lora] = restyle_with(pipe, LORA_DIR / f"{st.lora}.safetensors", st.lora, ids, ims, s, seed=seed)
            bar.update()
        rec = recognition(outs, truths, plain)
        rec["separability"] = separability(outs)
        rec["psnr_to_input"] = float(np.mean([psnr([np.asarray(o) for o in v], arr) for v in outs.values()]))
        rec["plain_psnr_to_input"] = psnr([np.asarray(o) for o in plain], arr)
        if s == strength:
            rec["images_per_s"] = throughput(pipe, LORA_DIR / f"{next(iter(STYLES.values())).lora}.safetensors", s)
        sweep[str(s)] = rec
        outs_at[s] = (plain, outs)
    bar.close()
    res["strength_sweep"] = sweep
    res["strength"] = strength
    if strength not in outs_at:
        plain = restyle_with(pipe, None, "none", ids, ims, strength, seed=seed)
        outs_at[strength] = (plain, {st.lora: restyle_with(pipe, LORA_DIR / f"{st.lora}.safetensors", st.lora, ids, ims,
                                                            strength, seed=seed) for st in STYLES.values()})
    plain, outs = outs_at[strength]
    res["recognition"] = sweep.get(str(strength)) or recognition(outs, truths, plain)
    if probe:  # (the study's stage 05 measures Table 3 itself; this cheaper probe is for trying recipes)
        res["retrieval_probe"] = retrieval_probe(pipe, {st.lora: LORA_DIR / f"{st.lora}.safetensors"
                                                        for st in STYLES.values()}, strength, seed=seed)
    rows = [[ims[c] for c in cols]] + [[outs[st.lora][c] for c in cols] for st in STYLES.values()]
    labels = ["original"] + [f"{st.short}\n({st.name})" for st in STYLES.values()]
    g = grid(rows, labels)
    with atomic_path(PREVIEW) as tmp:
        g.save(tmp, format="PNG", optimize=True)
    truth_rows = [[ims[c] for c in cols]] + [[truths[st.lora][c] for c in cols] for st in STYLES.values()]
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    grid(truth_rows, labels).save(RUN_DIR / "true_styles_preview.png")
    grid([[plain[c] for c in cols]] + rows[1:], ["no LoRA"] + labels[1:]).save(RUN_DIR / "preview_vs_plain.png")
    write_json_atomic(res, RUN_DIR / "evaluation.json")
    return res


#: styles of the strength probe: a tonal one (pencil), two textured (pixel art, pop art halftone), a wash
PROBE_SLUGS = ("xsarchitecture", "pixel_art", "pop_art", "illustration")


def strength_probe(seed: int = 0, strengths=(0.3, 0.5, 0.7), slugs=PROBE_SLUGS, steps: int = 150, progress: bool = True,
                   device: str = "cpu") -> dict:
    """Choose stage 01's strength by measurement: at each strength, bridge LoRAs for ``slugs`` (``steps`` each,
    trained for that strength) restyle the held-out photos; per strength the plain img2img PSNR to the photo, each
    LoRA's PSNR to the true style and the gain over plain img2img, the edge F1 to the control edges, and how often
    an output's nearest true style (:func:`recognition`, among ``slugs``) is its own."""
    pipe = load_world_pipeline(device=device)
    ids, ims = heldout_images()
    arr = [np.asarray(x) for x in ims]
    edges = [canny(x) for x in ims]
    truths_all = styled_images(ims)
    truths = {s: truths_all[s] for s in slugs}
    out: dict = {"steps": steps, "slugs": list(slugs), "n_heldout": len(ims), "per_strength": {}}
    for st in strengths:
        folder = RUN_DIR / "strength_probe" / f"s{st}"
        train_loras(seed, slugs=list(slugs), progress=progress, settings={"steps": steps}, device=device,
                    run_dir=folder / "lora_runs", out_dir=folder / "loras", strength=st)
        plain = restyle_with(pipe, None, "none", ids, ims, st, seed=seed)
        outs = {s: restyle_with(pipe, folder / "loras" / f"{s}.safetensors", s, ids, ims, st, seed=seed) for s in slugs}
        rec = recognition(outs, truths, plain)
        out["per_strength"][str(st)] = {
            "plain_psnr_to_photo": psnr([np.asarray(o) for o in plain], arr),
            "plain_edge_f1": float(np.mean([edge_f1(o, e) for o, e in zip(plain, edges)])),
            "psnr_to_style": {
                s: psnr([np.asarray(o) for o in outs[s]], [np.asarray(t) for t in truths[s]]) for s in slugs
            },
            "plain_psnr_to_style": {
                s: psnr([np.asarray(o) for o in plain], [np.asarray(t) for t in truths[s]]) for s in slugs
            },
            "recognition": rec["per_style"],
            "recognition_mean": rec["mean"],
        }
        r = out["per_strength"][str(st)]
        r["gain_db_mean"] = float(np.mean([r["psnr_to_style"][s] - r["plain_psnr_to_style"][s] for s in slugs]))
        cols = list(range(6))
        grid([[ims[c] for c in cols], [plain[c] for c in cols]] + [[outs[s][c] for c in cols] for s in slugs],
             ["photo", "no LoRA"] + list(slugs)).save(folder / "grid.png")
    write_json_atomic(out, RUN_DIR / "strength_probe" / "result.json")
    return out


def shipped_files() -> list[Path]:
    return sorted(
        p
        for p in WORLD_DIR.rglob("*")
        if p.is_file() and p.name != "record.json" and p.suffix not in (".py", ".md") and "__pycache__" not in p.parts
    )
