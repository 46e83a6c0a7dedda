"""Stage 07: train a style LoRA per rank, evaluate the sweep (FID, KID, LPIPS, CLIP score, IS), register
the LoRAs in the catalog."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lorafind_utils.core import layout
from lorafind_utils.core.files import atomic_path, write_json_atomic
from lorafind_utils.core.images import load_rgb, square_resize
from lorafind_utils.models.lora_training import (
    StyleImage,
    check_ranks,
    read_style_set,
    split_style_set,
    to_uint8,
    train_lora,
)


def register(catalog_path: str | Path, base_catalog: list[dict], trained: list[dict], lora_dir: str | Path) -> Path:
    """A catalog (``data/loras``-style YAML) with the profile's LoRAs plus the trained ones, so that
    stages 01-06 can synthesize with them and retrieve them (``catalog:`` + the same ``lora_dir:``).

    Each trained kohya file is copied into ``lora_dir`` as ``<slug>.safetensors`` (a catalog names
    files inside its ``lora_dir`` only), with its SHA-256 in the entry.

    LoRAs an earlier (or a concurrent) ``register`` put in the same catalog are kept: the catalog is
    read, merged (by slug; ``trained`` replaces) and written under one
    :func:`~lorafind_utils.core.files.run_lock`, so two registers into one catalog both land (the second
    waits its turn, up to 120 s, then is refused naming the first)."""
    import shutil

    import yaml

    from lorafind_utils.core.files import run_lock, sha256_file

    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    path = Path(catalog_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(path, "stage 07's register into this catalog", wait=120.0):
        by_slug = {e["slug"]: {k: v for k, v in e.items() if k != "path"} for e in base_catalog}
        if path.exists():  # read under the lock: what an earlier register added stays
            for e in (yaml.safe_load(path.read_text()) or {}).get("loras") or []:
                by_slug.setdefault(e["slug"], e)
        for t in trained:
            dest = lora_dir / f"{t['slug']}.safetensors"
            with atomic_path(dest) as tmp:
                shutil.copyfile(t["kohya"], tmp)
            by_slug.pop(t["slug"], None)  # replaced: the new entry goes last
            by_slug[t["slug"]] = {"slug": t["slug"], "name": t["name"], "short": t.get("short", t["name"]),
                                  "file": dest.name, "base_model": t.get("base_model", ""),
                                  "trigger_words": t.get("trigger_words", []),
                                  "sha256": sha256_file(dest)}
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump({"loras": list(by_slug.values())}, sort_keys=False))
    return path


def make_demo_style_set(base_folder: str | Path, out_folder: str | Path, n: int = 16, resolution: int = 64,
                        style: str = "duotone poster") -> Path:
    """A small real style set for the offline profile: ``n`` real photos of a base-image set given
    one consistent look (3-level posterization + a blue/orange duotone), with ``captions.csv``
    ("<subject>, in the style of <style>"). Idempotent."""
    from lorafind_utils.core.images import read_base_set

    out = Path(out_folder)
    if (out / "captions.csv").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    dark, light = np.array([20, 40, 110], np.float32), np.array([250, 170, 60], np.float32)
    for b in read_base_set(base_folder)[:n]:
        im = square_resize(load_rgb(b.path), resolution)
        lum = np.asarray(im.convert("L"), np.float32) / 255.0
        lum = np.round(lum * 2) / 2  # posterize to 3 levels
        px = (dark + (light - dark) * lum[..., None]).clip(0, 255).astype(np.uint8)
        name = f"{b.id}.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(px).save(tmp, format="PNG")
        rows.append({"file": name, "caption": f"{b.subject or b.id.replace('_', ' ')}, in the style of {style}"})
    with atomic_path(out / "captions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["file", "caption"])
            w.writeheader()
            w.writerows(rows)
    return out


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, steps: int, guidance: float, resolution: int) -> torch.Tensor:
    """uint8 [len(prompts), 3, R, R]; prompt i uses seed (seed, i) so sets are comparable across models."""
    gens = [torch.Generator("cpu").manual_seed(seed * 1000 + i) for i in range(len(prompts))]
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
               generator=gens, output_type="np").images
    return torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


def evaluate_sweep(
    base: str,
    loras: dict,
    heldout: list[StyleImage],
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    resolution: int,
    feature_net: str = "efficientnet_lite0",
    lpips_backbone: str = "random",
    clip_path: str = "",
    device: str = "cpu",
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Generate the same prompts and seeds with the base model and with every LoRA; score each set.

    :param loras: {label (e.g. "rank 4"): diffusers-layout LoRA file}.
    :return: (one row per (model, seed) with fid, kid, lpips, clip, is; {model: {seed: images}}).
    """
    from diffusers import StableDiffusionPipeline

    from lorafind_utils.models import style_metrics as sm
    from lorafind_utils.models.pipelines import quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    real = to_uint8(heldout)
    logits = sm.feature_extractor(feature_net, logits=True)
    fid_kid = sm.FidKid(real, sm.feature_extractor(feature_net))  # the held-out set's features once
    lp = sm.lpips_model(lpips_backbone)
    clip = sm.load_clip(clip_path) if clip_path else None
    rows, images = [], {}
    models = [("base", None)] + list(loras.items())
    bar = tqdm(total=len(models) * len(seeds), desc="evaluating", unit="set", disable=not progress)
    for label, path in models:
        if path:
            pipe.load_lora_weights(path, adapter_name=label.replace(" ", "_"))
        try:
            images[label] = {}
            for s in seeds:
                fake = sample_images(pipe, prompts, s, steps, guidance, resolution)
                images[label][s] = fake
                row = {"model": label, "seed": s, **fid_kid(fake),
                       "lpips": sm.lpips_to_set(fake, real, lp), **sm.inception_score(fake, logits)}
                if clip:
                    row["clip"] = sm.clip_score(fake, prompts, *clip)
                rows.append(row)
                bar.update()
        finally:
            if path:
                pipe.unload_lora_weights()
    bar.close()
    return rows, images


def run_sweep(cfg: dict, p: dict, progress: bool = True) -> dict:
    """Stage 07: data -> one LoRA per rank (resumable) -> evaluation -> artifacts under
    ``<runs_dir>/style_lora/<run_name>/``; returns rows, summary, files and timings."""
    from lorafind_utils.core.config import load_catalog, resolve
    from lorafind_utils.models.pipelines import prepare_models, profile_device

    base, _ = prepare_models(cfg)
    device = profile_device(cfg)
    run_dir = layout.style_lora_dir(cfg, p["run_name"])
    ranks = check_ranks(p["ranks"])
    if len(p["eval_prompts"]) < 2:  # checked before hours of training, not after them
        raise ValueError(f"eval_prompts: {len(p['eval_prompts'])} prompt(s); FID/KID compare sets of at least 2 "
                         "generated images, one per prompt and seed: give 2 or more prompts")
    style_dir = resolve(p["style_dir"]) if p["style_dir"] else make_demo_style_set(
        layout.base_set_dir(cfg, "variety"), layout.style_set_dir(run_dir), n=int(p["n_style_images"]),
        resolution=int(p["resolution"]), style=p["style_name"])
    items = read_style_set(style_dir, p["caption_template"], p["style_name"], int(p["resolution"]))
    train_items, heldout = split_style_set(items, float(p["holdout"]), int(p["seed"]))
    trained = []
    for r in ranks:
        res = train_lora(
            base,
            train_items,
            layout.style_rank_dir(run_dir, r),
            r,
            alpha=(p["alpha"] or None),
            steps=int(p["steps"]),
            lr=float(p["lr"]),
            batch_size=int(p["batch_size"]),
            seed=int(p["seed"]),
            checkpoint_every=int(p["checkpoint_every"]),
            device=device,
            progress=progress,
            snr_gamma=float(p["snr_gamma"]) or None,
        )
        trained.append({**res, "rank": r, "slug": f"{p['run_name']}_r{r}", "name": f"{p['style_name']} (rank {r})",
                        "short": f"{p['style_name']} r{r}", "base_model": cfg["models"]["base"]})
    clip_path = p["clip_model"]
    if clip_path == "tiny":
        from lorafind_utils.models.standins import ensure_tiny_clip

        clip_path = ensure_tiny_clip(layout.model_dir(cfg, "clip-tiny"))
    rows, images = evaluate_sweep(
        base,
        {f"rank {t['rank']}": t["lora"] for t in trained},
        heldout,
        list(p["eval_prompts"]),
        [int(s) for s in p["eval_seeds"]],
        int(p["infer_steps"]),
        float(p["guidance_scale"]),
        int(p["resolution"]),
        p["feature_net"],
        p["lpips_backbone"],
        clip_path,
        device=device,
        progress=progress,
    )
    catalog = register(layout.trained_catalog(run_dir), load_catalog(cfg), trained, layout.lora_dir(cfg))
    result = {
        "rows": rows,
        "trained": [{k: v for k, v in t.items() if k != "history"} for t in trained],
        "histories": {t["rank"]: t["history"] for t in trained},
        "train_seconds": {t["rank"]: t["train_seconds"] for t in trained},
        "steps_per_s": {t["rank"]: t["steps_per_s"] for t in trained},
        "catalog": str(catalog),
        "n_train": len(train_items),
        "n_heldout": len(heldout),
        "style_dir": str(style_dir),
        "feature_net": p["feature_net"],
        "lpips_backbone": p["lpips_backbone"],
        "clip_model": "seeded small CLIP (random weights)" if p["clip_model"] == "tiny" else clip_path,
    }
    write_json_atomic({k: v for k, v in result.items()}, layout.sweep_file(run_dir))
    result["images"] = images
    result["style_images"] = [np.asarray(it.image) for it in heldout]
    return result


def sweep_table(rows: list[dict]):
    """Mean ± sd over seeds per model (base, rank …), like the reference's table."""
    import pandas as pd

    df = pd.DataFrame(rows)
    metrics = [m for m in ("fid", "kid", "lpips", "clip", "is") if m in df]
    g = df.groupby("model", sort=False)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd"))
    out["seeds"] = g.size()
    return out.reset_index()


def write_sweep_table(df, stem, notes: str = "") -> dict:
    from lorafind_utils.core.files import write_csv_atomic, write_markdown_table

    stem = Path(stem)
    write_csv_atomic(df, stem.with_suffix(".csv"))
    metrics = [c[:-5] for c in df.columns if c.endswith("_mean")]
    names = {"fid": "FID ↓", "kid": "KID ↓", "lpips": "LPIPS ↓", "clip": "CLIP score ↑", "is": "IS ↑"}
    fmt = {"kid": "{:.4f}", "lpips": "{:.4f}"}
    head = ["model", *[names[m] for m in metrics], "seeds"]
    rows = [
        [
            r["model"],
            *[
                f"{fmt.get(m, '{:.2f}').format(r[m + '_mean'])} ± {fmt.get(m, '{:.2f}').format(r[m + '_sd'])}"
                for m in metrics
            ],
            str(r["seeds"]),
        ]
        for r in df.to_dict("records")
    ]
    write_markdown_table(stem.with_suffix(".md"), head, rows, notes)
    return {"csv": str(stem.with_suffix(".csv")), "md": str(stem.with_suffix(".md"))}
