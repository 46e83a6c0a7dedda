"""Benchmarks: ratios against a baseline measured in the same process (never absolute timed tests)."""
from __future__ import annotations

import resource
import time

import numpy as np
import torch


def bench_synth(cfg: dict, n_images: int = 8, n_loras: int = 3, batch_size: int = 8, steps: int | None = None,
                log=print) -> dict:
    """Stage-01 pipeline vs a naive loop on the same model, images and seeds.

    Naive: LoRA loaded for every image, classifier-free guidance 7.5, batch 1.
    Ours: each LoRA loaded once, guidance skipped (empty prompt), batched.
    Both are warmed up first; outputs are compared to show they are the same images.
    """
    from lorafind_utils.core import layout
    from lorafind_utils.core.config import stage_params
    from lorafind_utils.core.images import read_base_set
    from lorafind_utils.models.loras import load_lora
    from lorafind_utils.models.pipelines import load_pipeline, prepare_loras
    from lorafind_utils.models.restyle import item_seed, prepare_base_images, restyle

    p = stage_params(cfg, "01_synthesize")
    if steps:
        p["steps"] = steps
    catalog = prepare_loras(cfg)[:n_loras]
    pipe = load_pipeline(cfg, cfg["device"], p["dtype"])
    imgs = read_base_set(layout.base_set_dir(cfg, "variety"))[:n_images]
    prepared, _ = prepare_base_images(imgs, int(p["resolution"]), int(p["canny_low"]), int(p["canny_high"]))
    seeds = {
        (e["slug"], x.image.id): item_seed(int(p["seed"]), e["slug"], x.image.id) for e in catalog for x in prepared
    }

    def naive():
        outs = []
        for e in catalog:
            for x in prepared:
                load_lora(pipe, e["path"], e["slug"])
                # guidance 7.5 with an empty prompt: same result, twice the UNet work
                q = dict(p, guidance_scale=7.5)
                g = torch.Generator("cpu").manual_seed(seeds[(e["slug"], x.image.id)])
                out = pipe(
                    prompt="",
                    image=x.init,
                    control_image=x.control,
                    strength=float(q["strength"]),
                    num_inference_steps=int(q["steps"]),
                    controlnet_conditioning_scale=float(q["controlnet_scale"]),
                    guidance_scale=7.5,
                    generator=g,
                    output_type="np",
                ).images[0]
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
    t = time.perf_counter()
    a = naive()
    t_naive = time.perf_counter() - t
    t = time.perf_counter()
    b = ours()
    t_ours = time.perf_counter() - t
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


def bench_train(cfg: dict, n_images: int = 384, batch_size: int = 32, epochs: int = 2, backbone: str | None = None,
                log=print) -> dict:
    """Stage-02 data pipeline vs a plain ``ImageFolder`` + PIL loop, same model, same run.

    Baseline: torchvision ``ImageFolder`` on the stage-01 folders, PIL decode + resize +
    flip + ``ToTensor`` + ``Normalize`` every epoch, default memory format. Ours: decode
    once into a uint8 tensor (its one-time cost is reported and amortised over ``epochs``),
    augment and normalise on tensors, ``channels_last``. Same images, one warm-up step each.
    """
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from lorafind_utils.core import layout
    from lorafind_utils.core.config import load_catalog, stage_params
    from lorafind_utils.models.classifier import augment_batch, build_model, load_synth_set, normalize, set_trainable

    p = stage_params(cfg, "02_finetune")
    arch = backbone or p["backbone"]
    size = int(p["image_size"])
    synth = layout.synth_dir(cfg)
    classes = [e["slug"] for e in load_catalog(cfg)]
    torch.manual_seed(0)

    def fresh():
        m = build_model(len(classes), int(p["hidden"]), "none", backbone=arch)
        set_trainable(m, "finetune")
        m.train()
        return m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)

    def step(m, opt, x, y):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    # (both models normalise their input themselves, for their backbone)
    folder = datasets.ImageFolder(str(layout.synth_set_dir(synth, "variety")), transform=tf)
    idx = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))[:n_images].tolist()
    loader = DataLoader(Subset(folder, idx), batch_size=batch_size, shuffle=True, num_workers=0)
    m, opt = fresh()
    x, y = next(iter(loader))
    step(m, opt, x, y)  # warm-up
    t = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            step(m, opt, x, y)
    t_base = time.perf_counter() - t

    t = time.perf_counter()
    data = load_synth_set(synth, "variety", classes, size)
    rows = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(0))[:n_images]
    xs, ys = data.x[rows], data.y[rows]
    t_decode = time.perf_counter() - t
    m, opt = fresh()
    m = m.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    step(m, opt, normalize(xs[:batch_size]), ys[:batch_size])  # warm-up
    t = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(ys), generator=g)
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            step(m, opt, normalize(augment_batch(xs[b], g)), ys[b])
    t_ours = time.perf_counter() - t
    n = n_images * epochs
    res = {"images_per_epoch": n_images, "epochs": epochs, "image_size": size,
           "imagefolder_img_per_s": round(n / t_base, 2), "ours_img_per_s": round(n / t_ours, 2),
           "ours_img_per_s_incl_decode": round(n / (t_ours + t_decode * n_images / len(data.y)), 2),
           "speedup": round(t_base / t_ours, 2), "one_time_decode_s_whole_set": round(t_decode, 2)}
    res["backbone"] = arch
    log(f"training benchmark ({n_images} images x {epochs} epochs, {size} px, {arch}: late stages + head trained)")
    log(f"  ImageFolder + PIL loop: {res['imagefolder_img_per_s']} img/s")
    log(f"  cached tensors + channels_last: {res['ours_img_per_s']} img/s "
        f"({res['ours_img_per_s_incl_decode']} img/s counting its one-time decode)")
    log(f"  speed-up {res['speedup']}x")
    return res


def bench_rank(cfg: dict, n_queries: int = 64, repeats: int = 3, log=print) -> dict:
    """Ranking latency per query (file -> ranking, model loaded once) and batch throughput.

    Queries are stage-01 images written as PNG files, so decoding is included. Reports the
    median single-query latency over all queries and images/s for one batched call.
    """
    import statistics

    from lorafind_utils.core import layout
    from lorafind_utils.rank.classifier_ranker import Ranker

    ranker = Ranker.from_profile(cfg)
    synth = layout.synth_dir(cfg)
    files = [synth / it["file"] for it in layout.read_synth_manifest(synth)["items"]][:n_queries]
    if not files:
        raise FileNotFoundError(f"no stage-01 images in {synth}")
    ranker.rank(files[:2])  # warm-up
    lat = []
    for _ in range(repeats):
        for f in files:
            t = time.perf_counter()
            ranker.rank([f])
            lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        ranker.rank(files)
    t_batch = (time.perf_counter() - t) / repeats
    res = {"queries": len(files), "image_size": ranker.size, "backbone": ranker.backbone,
           "latency_ms_median": round(1000 * statistics.median(lat), 2),
           "latency_ms_p90": round(1000 * sorted(lat)[int(0.9 * (len(lat) - 1))], 2),
           "batch_img_per_s": round(len(files) / t_batch, 1),
           "batch_vs_single_speedup": round((statistics.mean(lat) * len(files)) / t_batch, 2),
           "threads": torch.get_num_threads()}
    log(f"ranking benchmark ({len(files)} PNG queries, {ranker.size} px, {ranker.backbone}, {res['threads']} threads)")
    log(
        f"  one query at a time: median {res['latency_ms_median']} ms, p90 {res['latency_ms_p90']} ms (decode included)"
    )
    log(
        f"  one batch of {len(files)}: {res['batch_img_per_s']} img/s ({res['batch_vs_single_speedup']}x one at a time)"
    )
    return res


def bench_workers(cfg: dict, runs: int = 4, n: int = 70, epochs: int = 5, images: int = 64,
                  parts: tuple = ("train", "synth"), log=print) -> dict:
    """Worker processes (one thread each) against one process using every core, same jobs.

    Training: ``runs`` ablation runs (``n`` base images per class, ``epochs``), as stages 03/04
    run them; needs stage 01's images. Synthesis: every LoRA x ``images`` base images, as stage 01
    runs them (one job per LoRA). Both sides are timed from the call, so the workers' start-up (spawn,
    imports, model loading) is included. Everything is written to a temporary folder. The
    defaults mirror the tiny study (a stage-04 run: 70 images per class, 5 epochs; stage 01's
    batches of 32); with much smaller jobs the workers' start-up outweighs the gain (measured in a
    fresh process: about 5 s of imports and data for training, 10 s with the tiny pipeline).
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lorafind_utils.core import layout
    from lorafind_utils.core.config import stage_params
    from lorafind_utils.stages.ablation import run_settings
    from lorafind_utils.stages.synthesis import synthesize

    cores = os.cpu_count() or 1
    synth = layout.synth_dir(cfg)
    layout.read_synth_manifest(synth)  # stage 01 must have finished
    res = {"cores": cores}
    with tempfile.TemporaryDirectory(prefix="lorafind-bench-") as tmp:
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        bcfg = {**cfg, "runs_dir": str(runs_dir)}
        layout.synth_dir(bcfg).symlink_to(synth.resolve(), target_is_directory=True)
        timings = {}
        if "train" in parts:
            settings = [("variety", n)]
            seeds = list(range(runs))
            for label, kw in (
                ("one process", dict(workers=1, threads=cores)),
                ("workers", dict(workers="auto", threads=1)),
            ):
                t = time.perf_counter()
                run_settings(bcfg, settings, seeds, epochs=epochs, patience=epochs, reuse=False, progress=False, **kw)
                timings[label] = time.perf_counter() - t
            img = runs * n * 12 * epochs
            res["train"] = {
                "runs": runs,
                "images_per_run": n * 12 * epochs,
                "one_process_s": round(timings["one process"], 2),
                "workers_s": round(timings["workers"], 2),
                "speedup": round(timings["one process"] / timings["workers"], 2),
                "one_process_img_per_s": round(img / timings["one process"], 1),
                "workers_img_per_s": round(img / timings["workers"], 1),
            }
            log(f"train {runs} runs x {n * 12 * epochs} images: one process ({cores} threads) "
                f"{timings['one process']:.1f} s, {min(cores, runs)} workers x 1 thread {timings['workers']:.1f} s "
                f"-> {res['train']['speedup']}x")
        if "synth" in parts:
            p = dict(stage_params(cfg, "01_synthesize"), sets=["variety"], max_images=images)
            for label, kw in (
                ("one process", dict(workers=1, threads=cores)),
                ("workers", dict(workers="auto", threads=1)),
            ):
                out = Path(tmp) / f"synth-{label.replace(' ', '-')}"
                t = time.perf_counter()
                man = synthesize(cfg, {**p, "threads": kw["threads"]}, out, progress=False, workers=kw["workers"])
                timings["synth " + label] = time.perf_counter() - t
                shutil.rmtree(out)
            loras = len(man["loras"])
            k = len(man["items"])
            res["synth"] = {"images": k, "one_process_s": round(timings["synth one process"], 2),
                            "workers_s": round(timings["synth workers"], 2),
                            "speedup": round(timings["synth one process"] / timings["synth workers"], 2)}
            log(
                f"synth {loras} LoRAs x {k // loras} images: one process ({cores} threads) "
                f"{timings['synth one process']:.1f} s, "
                f"{min(cores, loras)} workers x 1 thread {timings['synth workers']:.1f} s -> {res['synth']['speedup']}x"
            )
    return res
