"""Train a style LoRA on the UNet's attention layers (diffusers + PEFT), as diffusers' own
``train_text_to_image_lora.py`` does, and save it in the diffusers/PEFT and kohya layouts.

Data: a folder of style images with captions (``captions.csv`` with columns file,caption, or
``captions.jsonl`` with {"file", "caption"}), or a fixed template such as
``"{name}, in the style of {style}"``. Every problem with the data is reported before training.

Training: frozen VAE, text encoder and UNet; LoRA (rank r, alpha) on ``to_q/to_k/to_v/to_out.0``
of every UNet attention layer; epsilon-prediction MSE on the base model's DDPM noise schedule;
AdamW. Deterministic for a fixed seed on CPU; a checkpoint every ``checkpoint_every`` steps
(LoRA weights as safetensors, optimizer state read back with ``weights_only=True``) lets a killed
run resume and end with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lorafind_utils.core import layout
from lorafind_utils.core.files import atomic_path, write_json_atomic
from lorafind_utils.core.images import IMAGE_SUFFIXES, ImageError, control_maps, load_rgb, square_resize


def to_uint8(items: list[StyleImage]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(it.image).copy()).permute(2, 0, 1) for it in items])

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
#: LoCon: the attention projections plus the resnet convolutions (kohya's "LoCon" / LyCORIS conv layers)
LOCON_MODULES = TARGET_MODULES + ["conv1", "conv2"]


class StyleDataError(ValueError):
    """Style images or captions that cannot be trained on; the message names the problem."""


@dataclass
class StyleImage:
    file: str
    caption: str
    image: Image.Image
    #: the photo this style image was made from (paired training, ``objective="bridge"``); None otherwise
    source: Image.Image | None = None


#: LoRA training objectives: ``standard`` (epsilon prediction on the style images, as diffusers' and kohya's
#: trainers; stage 07's) and ``bridge`` (paired restyling adapter: photo -> style image at img2img strength s)
OBJECTIVES = ("standard", "bridge")


def bridge_start(base: str, strength: float, steps: int) -> int:
    """The timestep stage 01's img2img starts from at ``strength`` with ``steps`` inference steps: the first of the
    pipeline scheduler's (UniPC, from the base's own scheduler config) timesteps that img2img keeps."""
    import diffusers

    from lorafind_utils.models.pipelines import SCHEDULER, check_denoising_steps

    n = check_denoising_steps(steps, strength, "bridge")
    sch = getattr(diffusers, SCHEDULER).from_pretrained(base, subfolder="scheduler")
    sch.set_timesteps(int(steps))
    return int(sch.timesteps[int(steps) - n])


def bridge_targets(sched, z_photo: torch.Tensor, z_style: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   t_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paired ("bridge") objective's noisy latent and target for timesteps ``t <= t_start``.

    With ``c = sqrt(abar_s / (1 - abar_s))`` at the start timestep s, ``eps_eff = eps + c (z_photo - z_style)`` and
    ``z_t = sqrt(abar_t) z_style + sqrt(1 - abar_t) eps_eff``: at ``t = s`` this is exactly img2img's start
    ``sqrt(abar_s) z_photo + sqrt(1 - abar_s) eps``, and a solver whose predictions are ``eps_eff`` lands on
    ``z_style``. :return: (z_t, eps_eff)."""
    abar = sched.alphas_cumprod.to(z_photo.device, torch.float32)
    a_s = abar[int(t_start)]
    c = torch.sqrt(a_s / (1 - a_s))
    eps_eff = noise + c * (z_photo - z_style)
    return sched.add_noise(z_style, eps_eff, t), eps_eff


def x0_weights(sched, t: torch.Tensor, t_start: int) -> torch.Tensor:
    """Epsilon-loss weights that measure the error in x0 space, ``(1 - abar_t) / abar_t``, scaled to 1 at
    ``t_start``."""
    abar = sched.alphas_cumprod.to(t.device, torch.float32)
    w = (1 - abar[t]) / abar[t]
    return w / ((1 - abar[int(t_start)]) / abar[int(t_start)])


def read_style_set(folder: str | Path, template: str = "", style: str = "", resolution: int = 64,
                   min_images: int = 4) -> list[StyleImage]:
    """Read every image of ``folder`` with its caption; all problems are reported together.

    :param template: used when the folder has no captions file, e.g. ``"{name}, in the style of {style}"``
        (``{name}``: the file stem with ``_`` as spaces).
    :raises StyleDataError: unreadable images, captions naming missing images, images without a
        caption, or fewer than ``min_images`` images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StyleDataError(f"style folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    captions: dict[str, str] = {}
    if (folder / "captions.csv").exists():
        with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
            captions = {r["file"]: r["caption"] for r in csv.DictReader(f)}
    elif (folder / "captions.jsonl").exists():
        for i, line in enumerate((folder / "captions.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    captions[r["file"]] = r["caption"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise StyleDataError(f"captions.jsonl line {i}: {type(e).__name__}: {e}") from None
    elif not template:
        raise StyleDataError(f"{folder}: no captions.csv / captions.jsonl and no caption template given")
    problems = []
    missing = sorted(set(captions) - {p.name for p in files})
    if missing:
        problems.append(f"captions name missing images: {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else ""))
    out = []
    for p in files:
        if captions and p.name not in captions:
            problems.append(f"{p.name}: no caption")
            continue
        try:
            im = square_resize(load_rgb(p), resolution)
        except ImageError as e:
            problems.append(str(e))
            continue
        cap = captions.get(p.name) or template.format(name=p.stem.replace("_", " "), style=style)
        out.append(StyleImage(p.name, cap, im))
    if problems:
        raise StyleDataError(f"{folder}: " + "; ".join(problems))
    if len(out) < min_images:
        raise StyleDataError(f"{folder}: {len(out)} usable images, at least {min_images} are needed "
                             "(training and held-out evaluation images)")
    return out


def split_style_set(
    items: list[StyleImage], holdout: float = 0.25, seed: int = 0
) -> tuple[list[StyleImage], list[StyleImage]]:
    """(training, held-out) -- held-out style images are the reference for FID/KID/LPIPS."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_hold = max(2, int(round(holdout * len(items))))
    if len(items) - n_hold < 2:
        raise StyleDataError(f"{len(items)} images are too few to hold out {n_hold} for evaluation and still train")
    return [items[i] for i in sorted(order[n_hold:])], [items[i] for i in sorted(order[:n_hold])]


def check_ranks(ranks) -> list[int]:
    """Ranks must be positive integers."""
    out = []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) < 1:
            raise ValueError(f"LoRA rank {r!r} is not a positive integer")
        out.append(int(r))
    return out


def load_training_models(base: str, device: str = "cpu"):
    """VAE, text encoder, tokenizer, UNet and the DDPM noise schedule of the base model, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(device).eval()
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").to(device).eval()
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(device)
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (vae, te, unet):
        m.requires_grad_(False)
    return vae, te, tok, unet, sched


def _lora_params(unet):
    return {k: v for k, v in unet.named_parameters() if "lora_" in k}


def min_snr_weights(sched, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per timestep, as diffusers' training scripts compute them
    (``training_utils.compute_snr``): ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for v."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, timesteps)
    return torch.clamp(snr, max=float(gamma)) / (snr + 1 if sched.config.prediction_type == "v_prediction" else snr)


def train_lora(base: str, train_items: list[StyleImage], out_dir: str | Path, rank: int, alpha: float | None = None,
               steps: int = 200, lr: float = 1e-4, batch_size: int = 4, seed: int = 0, checkpoint_every: int = 50,
               device: str = "cpu", progress: bool = True, stop_after: int | None = None,
               target_modules: list[str] | None = None, max_timestep: int | None = None,
               min_timestep: int | None = None, snr_gamma: float | None = None, objective: str = "standard",
               controlnet: str | None = None, strength: float = 0.5, infer_steps: int = 10,
               canny: tuple[int, int] = (100, 200)) -> dict:
    """Train one LoRA; resumes from ``out_dir/checkpoint`` if a previous run stopped.

    :param objective: ``standard`` (default; stage 07's): epsilon prediction on the style images.
        ``bridge``: a paired restyling adapter; every item carries its ``source`` photo, and the LoRA learns to
        carry stage 01's img2img start from that photo (``strength``, ``infer_steps``) to the style image
        (:func:`bridge_targets`; timesteps ``t <= t_start``, loss in x0 space, :func:`x0_weights`), with the
        frozen ``controlnet`` (a folder; optional) fed the photo's Canny edges as stage 01 feeds them.

    :param target_modules: UNet module names the LoRA adapts (PEFT ``target_modules``); default the
        attention projections (:data:`TARGET_MODULES`); :data:`LOCON_MODULES` adds the resnet convs.

    :param max_timestep: sample training timesteps from ``[0, max_timestep)`` only (kohya's ``--max_timestep``):
        a LoRA used for img2img at strength s only ever sees timesteps below ``s * 1000``.
    :param min_timestep: sample from ``[min_timestep, max_timestep)`` (kohya's ``--min_timestep``).
    :param snr_gamma: Min-SNR loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``, kohya's
        ``--min_snr_gamma``): each sample's loss times ``min(SNR, gamma) / SNR`` (epsilon) or
        ``min(SNR, gamma) / (SNR + 1)`` (v-prediction), so the nearly-clean timesteps, whose loss is
        largest, stop drowning out the noisy ones that set an image's colours and layout.
    :param stop_after: stop (as a kill would) after this many steps in this call -- for tests.
    :return: {"history": [{step, loss}], "lora": diffusers-layout file, "kohya": kohya-layout file, ...}
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown LoRA objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    bridge = objective == "bridge"
    if bridge and any(it.source is None for it in train_items):
        missing = next(it.file for it in train_items if it.source is None)
        raise StyleDataError(f"objective 'bridge' trains on (photo, style image) pairs; {missing} has no source photo")
    rank = check_ranks([rank])[0]
    alpha = float(alpha if alpha is not None else rank)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae, te, tok, unet, sched = load_training_models(base, device)
    cn = None
    if bridge:
        if sched.config.prediction_type != "epsilon":
            raise ValueError(
                f"objective 'bridge' needs an epsilon-prediction base, not {sched.config.prediction_type!r}"
            )
        t_bridge = bridge_start(base, strength, infer_steps)
        if controlnet:
            from diffusers import ControlNetModel

            cn = ControlNetModel.from_pretrained(controlnet).to(device).eval().requires_grad_(False)
    torch.manual_seed(seed)
    targets = list(target_modules or TARGET_MODULES)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    params = _lora_params(unet)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=1e-2)
    # On a GPU: fp16 autocast with loss scaling (LoRA weights and optimizer stay fp32), as diffusers'
    # train_text_to_image_lora.py with --mixed_precision fp16. In fp32 the paper's batch 4 at 512 px
    # keeps ~31 GB of activations for the backward pass (counted by the dry run) and runs without
    # tensor cores. On CPU nothing changes.
    amp = torch.device(device).type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    # Encode the images and captions once (VAE and text encoder are frozen).
    with torch.no_grad():
        x = to_uint8(train_items).float().div(127.5).sub(1)
        means, stds = [], []
        for i in range(0, len(x), 8):  # in chunks: VAE activations are large at 512 px
            dist = vae.encode(x[i : i + 8].to(device)).latent_dist
            means.append(dist.mean * vae.config.scaling_factor)
            stds.append(dist.std * vae.config.scaling_factor)
        latents_mean, latents_std = torch.cat(means), torch.cat(stds)
        ids = tok([it.caption for it in train_items], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        text = te(ids)[0]
        if bridge:
            src = torch.from_numpy(
                np.stack(
                    [
                        np.asarray(square_resize(it.source.convert("RGB"), train_items[0].image.size[0]))
                        for it in train_items
                    ]
                )
            ).permute(0, 3, 1, 2)
            photo_lat = torch.cat([vae.encode(src[i : i + 8].float().div(127.5).sub(1).to(device)).latent_dist.mean
                                   * vae.config.scaling_factor for i in range(0, len(src), 8)])
            cond = control_maps(src, *canny).to(device)

    import hashlib

    data_sig = hashlib.sha256(json.dumps([[it.file, it.caption] for it in train_items]).encode()).hexdigest()[:16]
    run_sig = {
        "rank": rank,
        "alpha": alpha,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "base": str(base),
        "data": data_sig,
    }
    if targets != TARGET_MODULES:  # (absent for the default, so earlier checkpoints still resume)
        run_sig["targets"] = targets
    t_max = sched.config.num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 < t_max <= sched.config.num_train_timesteps:
        raise ValueError(f"max_timestep must be in 1..{sched.config.num_train_timesteps}, got {max_timestep}")
    if max_timestep is not None:
        run_sig["max_timestep"] = t_max
    t_min = 0 if min_timestep is None else int(min_timestep)
    if not 0 <= t_min < t_max:
        raise ValueError(f"min_timestep must be in 0..{t_max - 1} (below max_timestep), got {min_timestep}")
    if min_timestep is not None:
        run_sig["min_timestep"] = t_min
    if bridge:  # (absent for the standard objective, so earlier checkpoints still resume)
        src_sig = hashlib.sha256(
            b"".join(np.asarray(it.source.convert("RGB")).tobytes() for it in train_items)
        ).hexdigest()[:16]
        run_sig.update(objective="bridge", strength=float(strength), infer_steps=int(infer_steps), t_start=t_bridge,
                       controlnet=str(controlnet or ""), canny=list(canny), sources=src_sig)
        if max_timestep is None:
            t_max = t_bridge + 1
    if snr_gamma is not None:
        if not float(snr_gamma) > 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        run_sig["snr_gamma"] = float(snr_gamma)
    ckpt = layout.lora_checkpoint_dir(out_dir)
    start, history, seconds = 0, [], 0.0  # seconds: training time of all calls that made these steps
    g = torch.Generator().manual_seed(seed)
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        diff = sorted(k for k in run_sig if state.get("run", {}).get(k) != run_sig[k])
        if diff:
            raise ValueError(f"{ckpt} belongs to another run (differs in {', '.join(diff)}: "
                             f"rank {state['rank']}, alpha {state['alpha']}, seed {state['seed']}); "
                             "delete it or choose another folder")
        unet.load_state_dict(load_file(str(ckpt / "lora.safetensors")), strict=False)
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        g.set_state(torch.load(ckpt / "generator.pt", weights_only=True))
        if amp and (ckpt / "scaler.pt").exists():
            scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        start, history, seconds = state["step"], state["history"], float(state.get("seconds", 0.0))

    def trained_seconds() -> float:
        return seconds + (time.perf_counter() - t_start)

    def save_ckpt(step) -> float:
        ckpt.mkdir(exist_ok=True)
        elapsed = trained_seconds()
        with atomic_path(ckpt / "lora.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp))
        with atomic_path(ckpt / "optimizer.pt") as tmp:
            torch.save(opt.state_dict(), tmp)
        with atomic_path(ckpt / "generator.pt") as tmp:
            torch.save(g.get_state(), tmp)
        if amp:
            with atomic_path(ckpt / "scaler.pt") as tmp:
                torch.save(scaler.state_dict(), tmp)
        write_json_atomic({"step": step, "rank": rank, "alpha": alpha, "seed": seed, "run": run_sig, "history": history,
                           "seconds": elapsed}, ckpt / "state.json")
        return elapsed

    unet.train()
    n = len(train_items)
    bar = tqdm(
        range(start, steps), desc=f"LoRA rank {rank}", unit="step", disable=not progress, initial=start, total=steps
    )
    done_here, t_start = 0, time.perf_counter()
    for step in bar:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        noise = torch.randn(latents_mean[idx].shape, generator=g).to(device)
        lat = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g).to(device)
        t = torch.randint(t_min, t_max, (len(idx),), generator=g).to(device)
        if bridge:
            loss = _bridge_loss(unet, cn, sched, photo_lat[idx], latents_mean[idx], noise, t, t_bridge, text[idx],
                                cond[idx] if cn is not None else None, amp)
        else:
            loss = _standard_loss(unet, sched, lat, noise, t, text[idx], snr_gamma, amp)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        done_here += 1
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            saved_seconds = save_ckpt(step + 1)
        if stop_after is not None and done_here >= stop_after:
            bar.close()
            return {"history": history, "stopped_at": step + 1}
    bar.close()
    if done_here:
        seconds = saved_seconds  # as recorded with the final checkpoint (the last step always saves one)

    lora_sd = get_peft_model_state_dict(unet)
    files = save_lora_layouts(lora_sd, out_dir, alpha, unet.peft_config["default"].to_dict())
    meta = {"rank": rank, "alpha": alpha, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_images": [it.file for it in train_items], "base": str(base), "train_seconds": seconds,
            "steps_per_s": steps / seconds if seconds else float("nan"), "objective": objective}
    if bridge:
        meta.update(
            strength=float(strength), infer_steps=int(infer_steps), t_start=t_bridge, controlnet=str(controlnet or "")
        )
    write_json_atomic({**meta, "history": history}, layout.lora_training_record(out_dir))
    return {"history": history, **files, **meta}


def _standard_loss(unet, sched, lat, noise, t, text, snr_gamma: float | None, amp: bool) -> torch.Tensor:
    """Epsilon (or v) prediction MSE on noised style latents, optionally Min-SNR-gamma weighted."""
    noisy = sched.add_noise(lat, noise, t)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        pred = unet(noisy, t, text).sample
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":  # e.g. SD 2.1 (768)
        target = sched.get_velocity(lat, noise, t)
    else:
        raise ValueError(f"unsupported prediction type '{sched.config.prediction_type}'")
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(sched, t, snr_gamma)).mean()


def _bridge_loss(unet, cn, sched, z_photo, z_style, noise, t, t_start: int, text, cond, amp: bool) -> torch.Tensor:
    """The paired objective (:func:`bridge_targets`), the frozen ControlNet (if any) fed the photo's edges,
    the epsilon error weighted to x0 space (:func:`x0_weights`)."""
    noisy, target = bridge_targets(sched, z_photo, z_style, noise, t, t_start)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        extra = {}
        if cn is not None:
            down, mid = cn(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        pred = unet(noisy, t, text, **extra).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * x0_weights(sched, t, t_start)).mean()


def save_lora_layouts(peft_sd: dict, out_dir: Path, alpha: float, adapter_config: dict | None = None) -> dict:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers/PEFT, via ``save_lora_weights``) and
    ``lora_kohya.safetensors`` (kohya keys ``lora_unet_…`` with ``.alpha``, via diffusers'
    ``convert_state_dict_to_kohya``) for other SD tools."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    # The adapter config (with lora_alpha) goes into the file's metadata, else diffusers assumes alpha = r.
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in (adapter_config or {}).items()}
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=peft_sd, safe_serialization=True,
                                              unet_lora_adapter_metadata=meta or None)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    with atomic_path(layout.lora_kohya_file(out_dir)) as tmp:
        save_file(kohya, str(tmp), metadata={"ss_network_dim": str(next(v.shape[0] for k, v in kohya.items()
                                                                          if k.endswith("lora_down.weight"))),
                                             "ss_network_alpha": str(alpha)})
    return {"lora": str(layout.lora_diffusers_file(out_dir)), "kohya": str(layout.lora_kohya_file(out_dir))}


# ---------------------------------------------------------------------------------------------
# Rank sweep: train one LoRA per rank, generate with each (and the base), score the sets
# ---------------------------------------------------------------------------------------------


