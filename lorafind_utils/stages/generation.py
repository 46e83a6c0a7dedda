"""Stages 05-06: make held-out query images (tiny profile) and generate with retrieved LoRAs.

Generation is stage 01's pipeline (SD1.5 + ControlNet-Canny img2img, LoRA weight 1.0) for one
base image and seed, so that two LoRAs are compared on the same base image and noise.
Held-out queries for the tiny profile are made *differently* from the training images, as the
LoRA authors' thumbnails are: text-to-image with a prompt (no base image at all), and
img2img from base images of another set with other seeds and another strength.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from lorafind_utils.core.config import load_catalog
from lorafind_utils.core.images import load_rgb
from lorafind_utils.models.loras import load_lora
from lorafind_utils.models.pipelines import check_denoising_steps, load_pipeline
from lorafind_utils.models.restyle import Prepared, prepare_image, restyle


def prepare_base(path: str | Path, resolution: int, low: int = 100, high: int = 200) -> Prepared:
    """One base image file, decoded, squared and edge-detected (raises ImageError)."""
    from lorafind_utils.core.images import BaseImage

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
        return {
            "slug": Path(name).stem.replace(".", "_").replace(" ", "_") or "lora",
            "short": Path(name).stem,
            "path": str(name),
        }
    raise ValueError(
        f"unknown LoRA '{name}' (catalog: {', '.join(e['slug'] for e in catalog)}; or give a .safetensors path)"
    )


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
    :return: (rows for :func:`lorafind_utils.core.figures.figure8`, records with the numbers).
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
            rec["generations"].append(
                {"lora": slug, "rank": rank, "correct": slug == q["lora"], "style_similarity": sim}
            )
        rows.append(
            {
                "query": query_img,
                "query_label": f"Image{int(i) + 1} (by {catalog[q['lora']]['short']})",
                "base": base.init,
                "base_caption": f"base {base.image.id}\nstyle sim. {base_sim:.3f}",
                "generations": gens,
            }
        )
        records.append(rec)
    return rows, records
