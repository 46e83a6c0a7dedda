"""Benchmarks: ratios against a baseline measured in the same process (never absolute timed tests)."""
from __future__ import annotations

import resource
import time

import numpy as np


def bench_synth(cfg: dict, n_images: int = 8, n_loras: int = 3, batch_size: int = 8, steps: int | None = None,
                log=print) -> dict:
    """Stage-01 pipeline vs a naive loop on the same model, images and seeds.

    Naive: LoRA loaded for every image, classifier-free guidance 7.5, batch 1.
    Ours: each LoRA loaded once, guidance skipped (empty prompt), batched.
    Both are warmed up first; outputs are compared to show they are the same images.
    """
    from .config import resolve, stage_params
    from .images import read_base_set
    from .loras import load_lora
    from .synthesis import item_seed, load_pipeline, prepare_base_images, prepare_loras, restyle

    p = stage_params(cfg, "01_synthesize")
    if steps:
        p["steps"] = steps
    catalog = prepare_loras(cfg)[:n_loras]
    pipe = load_pipeline(cfg, cfg.get("device", "auto"), p.get("dtype", "float32"))
    imgs = read_base_set(resolve(cfg["base_images"]["variety"]))[:n_images]
    prepared, _ = prepare_base_images(imgs, int(p["resolution"]), int(p["canny_low"]), int(p["canny_high"]))
    seeds = {(e["slug"], x.image.id): item_seed(int(p["seed"]), e["slug"], x.image.id) for e in catalog for x in prepared}

    def naive():
        outs = []
        for e in catalog:
            for x in prepared:
                load_lora(pipe, e["path"], e["slug"])
                # guidance 7.5 with an empty prompt: same result, twice the UNet work
                q = dict(p, guidance_scale=7.5)
                g = __import__("torch").Generator("cpu").manual_seed(seeds[(e["slug"], x.image.id)])
                out = pipe(prompt="", image=x.init, control_image=x.control, strength=float(q["strength"]),
                           num_inference_steps=int(q["steps"]), controlnet_conditioning_scale=float(q["controlnet_scale"]),
                           guidance_scale=7.5, generator=g, output_type="np").images[0]
                outs.append(out)
                pipe.unload_lora_weights()
        return outs

    def ours():
        outs = []
        for e in catalog:
            load_lora(pipe, e["path"], e["slug"])
            for i in range(0, len(prepared), batch_size):
                chunk = prepared[i : i + batch_size]
                ims = restyle(pipe, chunk, [seeds[(e["slug"], x.image.id)] for x in chunk], p)
                outs += [np.asarray(im, dtype=np.float32) / 255 for im in ims]
            pipe.unload_lora_weights()
        return outs

    # warm-up (allocator, kernels, first LoRA conversion)
    load_lora(pipe, catalog[0]["path"], catalog[0]["slug"])
    restyle(pipe, prepared[:1], [0], p)
    pipe.unload_lora_weights()
    n = len(catalog) * len(prepared)
    t = time.perf_counter(); a = naive(); t_naive = time.perf_counter() - t
    t = time.perf_counter(); b = ours(); t_ours = time.perf_counter() - t
    diff = max(float(np.abs(np.round(x * 255) - np.round(y * 255)).max()) for x, y in zip(a, b))
    res = {
        "images": n, "naive_img_per_s": round(n / t_naive, 3), "ours_img_per_s": round(n / t_ours, 3),
        "speedup": round(t_naive / t_ours, 2), "max_pixel_diff_0_255": diff,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "resolution": int(p["resolution"]), "steps": int(p["steps"]), "batch_size": batch_size,
    }
    log(f"synthesis benchmark ({n} images, {p['resolution']} px, {p['steps']} steps)")
    log(f"  naive (LoRA per image, CFG 7.5, batch 1): {res['naive_img_per_s']} img/s")
    log(f"  lorafind (LoRA once, no CFG, batch {batch_size}): {res['ours_img_per_s']} img/s")
    log(f"  speed-up {res['speedup']}x; max pixel difference {diff:.0f}/255; peak RSS {res['peak_rss_mb']} MB")
    return res
