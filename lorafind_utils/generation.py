"""Stages 05-06: make held-out query images (tiny profile) and generate with retrieved LoRAs.

Generation is stage 01's pipeline (SD1.5 + ControlNet-Canny img2img, LoRA weight 1.0) for one
base image and seed, so that two LoRAs are compared on the same base image and noise.
Held-out queries for the tiny profile are made *differently* from the training images, as the
LoRA authors' thumbnails are: text-to-image with a prompt (no base image at all), and
img2img from base images of another set with other seeds and another strength.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import layout
from .config import load_catalog
from .files import atomic_path, write_json_atomic
from .images import load_rgb, read_base_set
from .loras import load_lora
from .models import check_denoising_steps, load_pipeline, prepare_loras
from .synthesis import Prepared, item_seed, prepare_base_images, prepare_image, restyle


def text_to_image_pipeline(pipe):
    """A text-to-image pipeline sharing the loaded pipeline's modules (and so its LoRA)."""
    from diffusers import StableDiffusionPipeline

    t2i = StableDiffusionPipeline.from_pipe(pipe)
    t2i.set_progress_bar_config(disable=True)
    return t2i


def make_queries(cfg: dict, p: dict, out_dir: str | Path, pipe=None, progress: bool = True) -> dict:
    """Held-out query images per LoRA in ``<out_dir>/<slug>/`` + ``manifest.json``. Resumable.

    :param p: ``prompts`` (text-to-image, one image each), ``query_set`` and ``images_per_lora``
        (img2img from that set's base images, a different one for each LoRA), ``seed``,
        ``strength``, ``steps``, ``guidance_scale``, ``resolution``, Canny thresholds; and
        ``style_query_set`` / ``style_query_images``: "style samples" -- photos of that set (never
        trained on) run through the true style of every catalog entry that names one
        (``style:``, a :mod:`lorafind_utils.styles` name), as a user's sample of a style would be.
    """
    out_dir = Path(out_dir)
    keys = ("prompts", "query_set", "images_per_lora", "seed", "strength", "steps", "guidance_scale", "resolution",
            "controlnet_scale", "canny_low", "canny_high")
    params = {k: p[k] for k in keys}
    if p.get("style_query_set"):  # (absent when off, so queries made before style samples existed still match)
        params.update(style_query_set=p["style_query_set"], style_query_images=int(p.get("style_query_images", 0)))
    man_path = layout.queries_manifest(out_dir)
    if man_path.exists():
        man = json.loads(man_path.read_text())
        if man.get("params") == json.loads(json.dumps(params)):
            return man
        raise ValueError(f"{out_dir} holds queries made with other parameters; delete it or choose another folder")
    if int(p["images_per_lora"]):
        check_denoising_steps(p["steps"], p["strength"], "stage 05 img2img queries")
    catalog = prepare_loras(cfg)  # only when queries must be made: finished ones need no LoRA file
    styles, photos = _style_sample_inputs(cfg, catalog, p)  # every named style checked before anything is made
    pipe = pipe or load_pipeline(cfg, cfg["device"], p["dtype"])
    t2i = text_to_image_pipeline(pipe)
    bases = read_base_set(layout.base_set_dir(cfg, p["query_set"]))
    prepared, _ = prepare_base_images(bases, int(p["resolution"]), int(p["canny_low"]), int(p["canny_high"]))
    n_img = int(p["images_per_lora"])
    queries = []
    total = len(catalog) * (len(p["prompts"]) + n_img) + len(styles) * len(photos)
    bar = tqdm(total=total, desc="query images", unit="img", disable=not progress)
    for k, e in enumerate(catalog):
        load_lora(pipe, e["path"], e["slug"], weight=1.0)
        try:
            for i, prompt in enumerate(p["prompts"]):
                rel = layout.query_rel(e["slug"], f"prompt{i}.png")
                s = item_seed(int(p["seed"]), e["slug"], f"prompt{i}")
                if not (out_dir / rel).exists():
                    im = t2i(prompt=prompt, num_inference_steps=int(p["steps"]), guidance_scale=float(p["guidance_scale"]),
                             height=int(p["resolution"]), width=int(p["resolution"]),
                             generator=torch.Generator("cpu").manual_seed(s)).images[0]
                    _save_png(im, out_dir / rel)
                queries.append({"file": rel, "lora": e["slug"], "seed": s, "how": f"text-to-image: '{prompt}'"})
                bar.update()
            if e["slug"] in styles:
                queries += _style_samples(e["slug"], styles[e["slug"]], photos, p["style_query_set"], out_dir)
                bar.update(len(photos))
            for j in range(n_img):
                x = prepared[(k * n_img + j) % len(prepared)]
                rel = layout.query_rel(e["slug"], f"{p['query_set']}_{x.image.id}.png")
                s = item_seed(int(p["seed"]), e["slug"], x.image.id)
                if not (out_dir / rel).exists():
                    im = restyle(pipe, [x], [s], p)[0]
                    _save_png(im, out_dir / rel)
                queries.append({"file": rel, "lora": e["slug"], "seed": s, "base_image": f"{p['query_set']}/{x.image.id}",
                                "how": f"img2img from {p['query_set']} image {x.image.id}, strength {p['strength']}"})
                bar.update()
        finally:
            pipe.unload_lora_weights()
    bar.close()
    man = {"params": params, "queries": queries}
    write_json_atomic(man, man_path)
    return man


def _style_sample_inputs(cfg: dict, catalog: list[dict], p: dict) -> tuple[dict, list]:
    """({slug: its Style} for the entries that name one, [(photo id, photo at the stage's resolution)]),
    both empty when style samples are off; an unknown style is an error naming the entry."""
    from .images import square_resize
    from .styles import get_style

    if not p.get("style_query_set"):
        return {}, []
    styles = {}
    for e in catalog:
        if e.get("style"):
            try:
                styles[e["slug"]] = get_style(str(e["style"]))
            except ValueError as err:
                raise ValueError(f"{cfg['catalog']}: LoRA {e['slug']}: {err}") from None
    if not styles:
        return {}, []
    bases = read_base_set(layout.base_set_dir(cfg, p["style_query_set"]))
    bases = bases[: int(p.get("style_query_images", 0)) or len(bases)]
    return styles, [(b.id, square_resize(load_rgb(b.path), int(p["resolution"]))) for b in bases]


def _style_samples(slug: str, style, photos: list, set_name: str, out_dir: Path) -> list[dict]:
    """One LoRA's style-sample queries: each photo in its true style (written once; resumable)."""
    out = []
    for pid, im in photos:
        rel = layout.query_rel(slug, f"style_{set_name}_{pid}.png")
        if not (out_dir / rel).exists():
            _save_png(style.fn(im), out_dir / rel)
        out.append({"file": rel, "lora": slug, "base_image": f"{set_name}/{pid}",
                    "how": f"style sample: {style.name} applied to {set_name} photo {pid}"})
    return out


def _save_png(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def prepare_base(path: str | Path, resolution: int, low: int = 100, high: int = 200) -> Prepared:
    """One base image file, decoded, squared and edge-detected (raises ImageError)."""
    from .images import BaseImage

    return prepare_image(BaseImage(Path(path).stem, Path(path)), load_rgb(path), resolution, low, high)


def resolve_lora(cfg: dict, name: str) -> dict:
    """A catalog entry by slug or short name, or a LoRA file given by path."""
    catalog = load_catalog(cfg)
    for e in catalog:
        if name in (e["slug"], e["short"]):
            return e
    if Path(name).suffix:
        if not Path(name).exists():
            raise FileNotFoundError(f"LoRA file {name} not found")
        return {"slug": Path(name).stem.replace(".", "_").replace(" ", "_") or "lora", "short": Path(name).stem, "path": str(name)}
    raise ValueError(f"unknown LoRA '{name}' (catalog: {', '.join(e['slug'] for e in catalog)}; or give a .safetensors path)")


def generate(pipe, lora: dict, base: Prepared, seed: int, p: dict, prompt: str = "", callback=None) -> Image.Image:
    """Restyle one base image with one LoRA at weight 1.0 (stage 01's settings), then unload it.

    :raises LoraError: (from :func:`load_lora`) a file that does not fit the base model, before any work.
    """
    load_lora(pipe, lora["path"], lora["slug"], weight=1.0)
    try:
        return restyle(pipe, [base], [int(seed)], p, prompt=prompt, callback=callback)[0]
    finally:
        pipe.unload_lora_weights()


def figure8_rows(cfg: dict, rankings: dict, query_indexes: list[int], base: Prepared, seed: int, p: dict, ranker,
                 pipe=None, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Generate, for each chosen query, with its top-1 LoRA and with the correct LoRA (if the
    top-1 is correct: with the 1st and the 2nd), from the same base image and seed; score each
    generation's style similarity to the query.

    :param rankings: stage 05's ``rankings.json``.
    :return: (rows for :func:`lorafind_utils.figures.figure8`, records with the numbers).
    """
    check_denoising_steps(p["steps"], p["strength"], "stage 06 (stage 01's steps and strength)")
    catalog = {e["slug"]: e for e in load_catalog(cfg)}
    pipe = pipe or load_pipeline(cfg, cfg["device"], p["dtype"])
    qs = rankings["queries"]
    bad = [i for i in query_indexes if not 0 <= int(i) < len(qs)]
    if bad:
        raise ValueError(f"query indexes {bad} out of range: stage 05 ranked {len(qs)} queries (0..{len(qs) - 1})")
    rows, records = [], []
    for i in tqdm(query_indexes, desc="generating", unit="query", disable=not progress):
        q = qs[int(i)]
        order = [x["lora"] for x in q["ranking"]]
        picks = [order[0], q["lora"]] if order[0] != q["lora"] else order[:2]
        query_img = load_rgb(q["file"])
        base_sim = ranker.style_similarity(query_img, base.init)
        gens, rec = [], {"query": f"Image{int(i) + 1}", "file": q["file"], "correct": q["lora"], "base": base.image.id,
                         "seed": int(seed), "base_similarity": base_sim, "generations": []}
        for slug in picks:
            im = generate(pipe, catalog[slug], base, seed, p)
            sim = ranker.style_similarity(query_img, im)
            rank = order.index(slug) + 1
            gens.append((im, f"{catalog[slug]['short']} (rank {rank})\nstyle sim. {sim:.3f}", slug == q["lora"]))
            rec["generations"].append({"lora": slug, "rank": rank, "correct": slug == q["lora"], "style_similarity": sim})
        rows.append({"query": query_img, "query_label": f"Image{int(i) + 1} (by {catalog[q['lora']]['short']})",
                     "base": base.init, "base_caption": f"base {base.image.id}\nstyle sim. {base_sim:.3f}", "generations": gens})
        records.append(rec)
    return rows, records
