"""The dry run's cost model: FLOPs counted on the meta device, activation memory, the paper's workload and
GPU-hour estimates."""
from __future__ import annotations

import math

import torch


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

    from lorafind_utils.models import hub_configs as C
    from lorafind_utils.models.classifier import build_model, set_trainable, train_mode
    from lorafind_utils.models.lora_training import TARGET_MODULES

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
        out["unet_step"] = _count(
            lambda: unet(
                x,
                t,
                encoder_hidden_states=txt,
                down_block_additional_residuals=res["d"],
                mid_block_additional_residual=res["m"],
            )
        )
        out["unet_step_plain"] = _count(lambda: unet(x, t, encoder_hidden_states=txt))
        out["vae_encode"] = _count(lambda: vae.encode(cond))
        out["vae_decode"] = _count(lambda: vae.decode(x))
        out["text_encoder"] = _count(lambda: te(torch.zeros(1, 77, dtype=torch.long, device=dev)))
    unet.add_adapter(
        LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    )
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

    from lorafind_utils.models import hub_configs as C
    from lorafind_utils.models.lora_training import TARGET_MODULES

    unet = C.meta_sd15_unet()
    unet.add_adapter(
        LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    )
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
    from lorafind_utils.core.config import load_profile

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
        "01_synthesize": {
            "what": f"{n_loras} LoRAs x ({n_variety} variety + {n_faces} faces) images, "
            f"{int(p1['steps'] * p1['strength'])} of {p1['steps']} steps (strength {p1['strength']})",
            "flops": n_loras * (n_variety + n_faces) * restyle,
        },
        "02_finetune": {
            "what": f"{n_loras}x{n_train} images x {p2['epochs']} epochs + validation + linear probe",
            "flops": run(n_train, p2["epochs"]) + n_loras * (n_train + n_val) * ev,
        },
        "03_ablate_sizes": {
            "what": f"sizes {p3['sizes']} x {len(p3['seeds'])} seeds x {p3['epochs']} epochs",
            "flops": sizes,
        },
        "04_domain_vs_variety": {
            "what": f"{p4['n']} faces x {len(p4['seeds'])} seeds x {p4['epochs']} epochs",
            "flops": domain,
        },
        "05_retrieve_thumbnails": {"what": "a few hundred classifier forwards", "flops": n_loras * 20 * ev},
        "06_generate": {
            "what": f"{len(p6['queries'])} queries x 2 generations",
            "flops": len(p6["queries"]) * 2 * restyle,
        },
        "07_train_style_lora": {
            "what": f"{len(p7['ranks'])} ranks x {p7['steps']} steps x batch {p7['batch_size']}; "
            f"eval {n_eval} images x {p7['infer_steps']} steps with guidance",
            "flops": len(p7["ranks"]) * p7["steps"] * p7["batch_size"] * f["lora_train_step"] + n_eval * eval_img,
        },
    }
    if (
        p8
    ):  # style encoders (stage 02's trainable layers, bases_per_batch bases x every LoRA per step), folds, `index add`
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
        "gpu": gpu,
        "peak_flops": peak,
        "utilisation": utilisation,
        "stages_h": {k: v["flops"] / rate / 3600 for k, v in work["stages"].items()},
        "total_h": work["total"] / rate / 3600,
        "benchmark_setting": "SD1.5 + ControlNet, 512 px, 50 steps, guidance (2 UNet+ControlNet passes per step)",
        "benchmark_flops_per_image": bench,
        "implied_img_per_s": rate / bench,
        "published_a100_img_per_s": [lo, hi],
        "published_implies_utilisation": [u_lo, u_hi],
        # the whole study at the utilisations the published throughput implies (slowest first)
        "total_h_at_published_utilisation": [
            work["total"] / (peak * u_lo) / 3600,
            work["total"] / (peak * u_hi) / 3600,
        ],
    }
