"""Stage 05: held-out query images, their rankings by the stage-02 classifier, and Table 3."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lorafind_utils.core import layout
from lorafind_utils.core.files import atomic_path, write_json_atomic
from lorafind_utils.core.images import ImageError, load_rgb, read_base_set
from lorafind_utils.models.loras import load_lora
from lorafind_utils.models.pipelines import check_denoising_steps, load_pipeline, prepare_loras
from lorafind_utils.models.restyle import item_seed, prepare_base_images, restyle
from lorafind_utils.rank.classifier_ranker import Ranker, Ranking, retrieval_metrics


@dataclass
class Query:
    id: str
    path: Path
    lora: str  # the LoRA that made it (the correct answer)
    how: str = ""


def read_queries(folder: str | Path, catalog: list[dict]) -> list[Query]:
    """Query images in ``<folder>/<lora slug>/*`` (the paper: the LoRA authors' Civitai previews).

    :raises FileNotFoundError: no folder, or no images in it. Unknown sub-folders are errors.
    """
    import json

    from lorafind_utils.core.images import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"query folder {folder} does not exist (one sub-folder per LoRA slug with its images)")
    slugs = {e["slug"] for e in catalog}
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in slugs)
    if unknown:
        raise ValueError(f"{folder}: sub-folders {unknown} are not LoRAs of the catalog")
    how = {}
    if layout.queries_manifest(folder).exists():
        how = {q["file"]: q.get("how", "") for q in json.loads(layout.queries_manifest(folder).read_text())["queries"]}
    out = []
    for e in catalog:
        for p in sorted((folder / e["slug"]).glob("*")) if (folder / e["slug"]).is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                rel = layout.query_rel(e["slug"], p.name)
                out.append(Query(f"{e['slug']}/{p.stem}", p, e["slug"], how.get(rel, "")))
    if not out:
        raise FileNotFoundError(f"{folder}: no query images")
    return out


def rank_queries(ranker: Ranker, queries: list[Query]) -> tuple[list[tuple[Query, Ranking]], list[dict]]:
    """Rank every query; an unreadable one is reported, not fatal.

    :return: ([(query, its ranking), ...], [{"query", "reason"}, ...] for the skipped ones).
    """
    res = ranker.rank_files([q.path for q in queries], [q.id for q in queries])
    pairs = [(q, r) for q, r in zip(queries, res) if isinstance(r, Ranking)]
    skipped = [{"query": q.id, "reason": str(r)} for q, r in zip(queries, res) if isinstance(r, ImageError)]
    return pairs, skipped


def evaluate_queries(pairs: list[tuple[Query, Ranking]], n_loras: int) -> dict:
    """Table 3's metrics over all queries, and per kind of query (the first word of ``how``)."""
    out = {"all": retrieval_metrics([r.rank_of(q.lora) for q, r in pairs], n_loras)}
    kinds: dict[str, list[int]] = {}
    for q, r in pairs:
        kinds.setdefault(q.how.split(" ")[0].rstrip(":") or "query", []).append(r.rank_of(q.lora))
    if len(kinds) > 1:
        out.update({k: retrieval_metrics(v, n_loras) for k, v in kinds.items()})
    return out


def table3(pairs: list[tuple[Query, Ranking]], catalog: list[dict], k: int = 9):
    """Table 3 as the paper draws it: one row per query, columns 1st..kth (LoRA names)."""
    import pandas as pd

    short = {e["slug"]: e["short"] for e in catalog}
    ordinals = _ordinals(min(k, len(catalog)))
    rows = []
    for i, (q, r) in enumerate(pairs, 1):
        row = {
            "query": f"Image{i}",
            "file": q.id,
            "correct": short[q.lora],
            "how": q.how,
            "rank_of_correct": r.rank_of(q.lora),
        }
        row.update({o: n for o, n in zip(ordinals, r.names[:k])})
        row["score_1st"] = round(r.scores[0], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def _ordinals(k: int) -> list[str]:
    return ["1st", "2nd", "3rd"][:k] + [f"{i}th" for i in range(4, k + 1)]


def write_table3(df, metrics: dict, stem: str | Path, k: int = 9) -> dict:
    """``<stem>.csv`` (per query), ``<stem>.md`` (correct LoRA in bold, metrics below)."""
    from lorafind_utils.core.files import write_csv_atomic, write_markdown_table

    stem = Path(stem)
    write_csv_atomic(df, stem.with_suffix(".csv"))
    ordinals = [o for o in _ordinals(k) if o in df.columns]
    rows = [
        [
            r["query"],
            *[f"**{r[o]}**" if r[o] == r["correct"] else str(r[o]) for o in ordinals],
            str(r["rank_of_correct"]),
        ]
        for r in df.to_dict("records")
    ]
    m = metrics
    caption = (f"Over {m['queries']} queries: top-1 {100 * m['top1']:.1f} %, top-3 {100 * m['top3']:.1f} %, "
                  f"top-6 {100 * m['top6']:.1f} %, MRR {100 * m['mrr']:.1f} %"
                  + (f" (a random ranking: top-1 {100 * m['chance_top1']:.1f} %, MRR {100 * m['chance_mrr']:.1f} %)"
                     if "chance_mrr" in m else "") + ". Bold: the LoRA that made the query image.")
    write_markdown_table(stem.with_suffix(".md"), ["", *ordinals, "rank of correct"], rows, caption)
    from lorafind_utils.core.figures import table3_png

    table3_png(df, ordinals, caption.replace("Bold", "Green"), stem.with_suffix(".png"))
    return {
        "csv": str(stem.with_suffix(".csv")),
        "md": str(stem.with_suffix(".md")),
        "png": str(stem.with_suffix(".png")),
    }


def save_rankings(pairs: list[tuple[Query, Ranking]], metrics: dict, ranker: Ranker, skipped: list[dict],
                  path: str | Path) -> Path:
    """Stage 05's artifact for stage 06: every query's full ranking, the metrics and the classifier used."""
    from lorafind_utils.core.files import write_json_atomic

    data = {
        "classifier": str(ranker.labels.get("run_name", "")),
        "backbone": ranker.backbone,
        "metrics": metrics,
        "skipped": skipped,
        "queries": [
            {
                "id": q.id,
                "file": str(q.path),
                "lora": q.lora,
                "how": q.how,
                "rank_of_correct": r.rank_of(q.lora),
                **r.as_dict(),
            }
            for q, r in pairs
        ],
    }
    write_json_atomic(data, path)
    return Path(path)


def example_rows(
    pairs: list[tuple[Query, Ranking]], samples: dict[str, Image.Image], n: int = 6, k: int = 5
) -> list[dict]:
    """Rows for :func:`lorafind_utils.core.figures.retrieval_figure`: ``n`` queries spread over the set."""
    idx = np.unique(np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int))
    rows = []
    for i in idx:
        q, r = pairs[i]
        rows.append(
            {
                "query": load_rgb(q.path),
                "label": f"Image{i + 1}\n({r.names[r.rank_of(q.lora) - 1]}, rank {r.rank_of(q.lora)})",
                "correct": q.lora,
                "top": [(s, nm, sc, samples[s]) for s, nm, sc in r.top(k)],
            }
        )
    return rows


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
        (``style:``, a :mod:`lorafind_utils.core.styles` name), as a user's sample of a style would be.
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
                    im = t2i(
                        prompt=prompt,
                        num_inference_steps=int(p["steps"]),
                        guidance_scale=float(p["guidance_scale"]),
                        height=int(p["resolution"]),
                        width=int(p["resolution"]),
                        generator=torch.Generator("cpu").manual_seed(s),
                    ).images[0]
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
                queries.append(
                    {
                        "file": rel,
                        "lora": e["slug"],
                        "seed": s,
                        "base_image": f"{p['query_set']}/{x.image.id}",
                        "how": f"img2img from {p['query_set']} image {x.image.id}, strength {p['strength']}",
                    }
                )
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
    from lorafind_utils.core.images import square_resize
    from lorafind_utils.core.styles import get_style

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
