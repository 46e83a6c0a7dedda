"""Stage 05: rank every LoRA in the catalog for style images with a trained classifier.

The classifier of stage 02 is loaded once; each query image (any common format and mode,
see :func:`lorafind_utils.images.load_rgb`) is centre-cropped to a square and resized to the
classifier's input size, and the softmax over the K LoRAs is the ranking (the paper ranks by
the output of the second fully connected layer). Also here: Table 3's metrics and a style
similarity measure used by stage 06.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .classifier import load_checkpoint, normalize, predict
from . import layout
from .config import load_catalog, stage_params
from .images import ImageError, load_rgb, square_resize, to_rgb


@dataclass
class Ranking:
    """Every LoRA of the catalog for one query, best first; scores are probabilities (sum 1)."""

    query: str
    slugs: list[str]
    names: list[str]
    scores: list[float]
    #: index rankings: does the catalog have the query's LoRA ("none of these" when False), and P of it
    match: bool | None = None
    match_p: float | None = None
    method: str = "classifier"

    def rank_of(self, slug: str) -> int:
        """1-based position of ``slug`` in this ranking."""
        return self.slugs.index(slug) + 1

    def top(self, k: int) -> list[tuple[str, str, float]]:
        return list(zip(self.slugs, self.names, self.scores))[:k]

    def as_dict(self, k: int | None = None) -> dict:
        out = {"query": self.query, "method": self.method}
        if self.match is not None:
            out.update(match=self.match, match_probability=round(self.match_p, 4))
        out["ranking"] = [{"rank": i + 1, "lora": s, "name": n, "score": round(p, 6)}
                          for i, (s, n, p) in enumerate(self.top(k or len(self.slugs)))]
        return out

    def verdict(self) -> str:
        """One line: the best LoRA, or (index rankings) that no LoRA of the catalog paints like this."""
        if self.match is False:
            return (f"no LoRA in the catalog paints like this -- closest: {self.names[0]} (score {self.scores[0]:.3f}, "
                    f"P(match) {self.match_p:.2f}); train one with `lorafind train-lora`")
        return f"best: {self.names[0]} (score {self.scores[0]:.3f})"


class Ranker:
    """A trained classifier, loaded once, that ranks the catalog's LoRAs for query images."""

    def __init__(self, ckpt_dir: str | Path, catalog: list[dict], device: str = "cpu"):
        self.slugs = [e["slug"] for e in catalog]
        self.names = {e["slug"]: e["short"] for e in catalog}
        self.model, self.labels = load_checkpoint(ckpt_dir, self.slugs, device)
        self.size = int(self.labels.get("image_size", 64))
        self.device = device
        self.backbone = self.labels.get("backbone", self.model.backbone_name)

    @classmethod
    def from_profile(cls, cfg: dict, run_name: str | None = None, device: str = "cpu") -> "Ranker":
        """The classifier that stage 02 trained for this profile (or the named run)."""
        run = run_name or stage_params(cfg, "02_finetune")["run_name"]
        ckpt = layout.train_dir(cfg, run)
        if not layout.model_file(ckpt).exists():
            raise FileNotFoundError(f"no trained classifier in {ckpt}: run stage 02 first "
                                    f"(`lorafind train --profile {cfg['name']}` or notebook 02_finetune)")
        if not layout.metrics_file(ckpt).exists():  # runs are swapped in whole; this one never finished
            raise FileNotFoundError(f"{ckpt} is an unfinished training run (no metrics.json): train it again "
                                    f"(`lorafind train --profile {cfg['name']}`)")
        return cls(ckpt, load_catalog(cfg), device)

    def preprocess(self, image: str | Path | Image.Image) -> torch.Tensor:
        """A query as the classifier sees it: uint8 [3, S, S] (square crop, resize).

        :raises ImageError: empty, truncated, not an image, or too large to decode safely.
        """
        im = load_rgb(image) if not isinstance(image, Image.Image) else to_rgb(image)
        im = square_resize(im, self.size)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    def rank(self, images: list, names: list[str] | None = None, batch_size: int = 64) -> list[Ranking]:
        """Rank every LoRA for each image (paths or PIL images), best first."""
        names = names or [str(Path(im).name) if not isinstance(im, Image.Image) else f"image {i}" for i, im in enumerate(images)]
        return self.rank_tensors(torch.stack([self.preprocess(im) for im in images]), names, batch_size)

    def rank_files(self, paths: list, names: list[str] | None = None, batch_size: int = 64) -> list:
        """Rank image files, each decoded once, in batches. An unreadable file is not fatal: its
        place in the returned list (one entry per path, in order) holds its :class:`ImageError`."""
        names = names or [str(p) for p in paths]
        out: list = []
        xs, ok = [], []
        for i, path in enumerate(paths):
            try:
                xs.append(self.preprocess(path))
                ok.append(i)
                out.append(None)
            except ImageError as e:
                out.append(e)
        if ok:
            for i, r in zip(ok, self.rank_tensors(torch.stack(xs), [names[i] for i in ok], batch_size)):
                out[i] = r
        return out

    def rank_tensors(self, x: torch.Tensor, names: list[str], batch_size: int = 64) -> list[Ranking]:
        """Rank every LoRA for preprocessed images (uint8 [N, 3, S, S], see :meth:`preprocess`)."""
        probs = predict(self.model, x, batch_size, self.device).double().numpy()
        out = []
        for q, p in zip(names, probs):
            order = np.argsort(-p, kind="stable")
            out.append(Ranking(q, [self.slugs[i] for i in order], [self.names[self.slugs[i]] for i in order],
                               [float(p[i]) for i in order]))
        return out

    @torch.no_grad()
    def style_similarity(self, a: Image.Image | str | Path, b: Image.Image | str | Path) -> float:
        """Style similarity of two images: cosine similarity of the Gram matrices of the
        classifier backbone's early, frozen (ImageNet) features -- texture and colour statistics
        independent of layout (Gatys et al.); 1 = identical statistics. Not the ranking itself,
        which uses the trained layers."""
        x = torch.stack([self.preprocess(a), self.preprocess(b)])
        g = gram_matrices(self.model, normalize(x.to(self.device))).flatten(1)
        return float(torch.nn.functional.cosine_similarity(g[0:1], g[1:2]))


def early_features(model, x: torch.Tensor) -> torch.Tensor:
    """The frozen early stages of the classifier's backbone (before the fine-tuned ones)."""
    z = (x - model.mean) / model.std
    if model.backbone_name == "resnet50":
        b = model.backbone
        return b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(z))))))
    n = model.backbone.net
    z = n._swish(n._bn0(n._conv_stem(z)))
    for blk in n._blocks[:5]:
        z = blk(z)
    return z


def gram_matrices(model, x: torch.Tensor) -> torch.Tensor:
    """[N, C, C] Gram matrices of :func:`early_features`, normalised by the spatial size."""
    model.eval()
    f = early_features(model, x).flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


def retrieval_metrics(ranks, n_loras: int | None = None) -> dict:
    """Top-1/3/6 accuracy and MRR from the 1-based ranks of the correct LoRA, one per query.

    With ``n_loras``, also the chance values of a random ranking (top-1 1/K, MRR H_K / K).
    """
    r = np.asarray(ranks, dtype=np.float64)
    if len(r) == 0:
        raise ValueError("no queries")
    out = {"queries": int(len(r)), "top1": float(np.mean(r <= 1)), "top3": float(np.mean(r <= 3)),
           "top6": float(np.mean(r <= 6)), "mrr": float(np.mean(1.0 / r)), "median_rank": float(np.median(r))}
    if n_loras:
        out["chance_top1"] = 1 / n_loras
        out["chance_mrr"] = float(np.mean(1.0 / np.arange(1, n_loras + 1)))
    return out


# ---------------------------------------------------------------------------------------------
# Query sets ("thumbnails")
# ---------------------------------------------------------------------------------------------


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

    from .images import IMAGE_SUFFIXES

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
        row = {"query": f"Image{i}", "file": q.id, "correct": short[q.lora], "how": q.how, "rank_of_correct": r.rank_of(q.lora)}
        row.update({o: n for o, n in zip(ordinals, r.names[:k])})
        row["score_1st"] = round(r.scores[0], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def _ordinals(k: int) -> list[str]:
    return ["1st", "2nd", "3rd"][:k] + [f"{i}th" for i in range(4, k + 1)]


def write_table3(df, metrics: dict, stem: str | Path, k: int = 9) -> dict:
    """``<stem>.csv`` (per query), ``<stem>.md`` (correct LoRA in bold, metrics below)."""
    from .files import write_csv_atomic, write_markdown_table

    stem = Path(stem)
    write_csv_atomic(df, stem.with_suffix(".csv"))
    ordinals = [o for o in _ordinals(k) if o in df.columns]
    rows = [[r["query"], *[f"**{r[o]}**" if r[o] == r["correct"] else str(r[o]) for o in ordinals], str(r["rank_of_correct"])]
            for r in df.to_dict("records")]
    m = metrics
    caption = (f"Over {m['queries']} queries: top-1 {100 * m['top1']:.1f} %, top-3 {100 * m['top3']:.1f} %, "
                  f"top-6 {100 * m['top6']:.1f} %, MRR {100 * m['mrr']:.1f} %"
                  + (f" (a random ranking: top-1 {100 * m['chance_top1']:.1f} %, MRR {100 * m['chance_mrr']:.1f} %)"
                     if "chance_mrr" in m else "") + ". Bold: the LoRA that made the query image.")
    write_markdown_table(stem.with_suffix(".md"), ["", *ordinals, "rank of correct"], rows, caption)
    from .figures import table3_png

    table3_png(df, ordinals, caption.replace("Bold", "Green"), stem.with_suffix(".png"))
    return {"csv": str(stem.with_suffix(".csv")), "md": str(stem.with_suffix(".md")), "png": str(stem.with_suffix(".png"))}


def save_rankings(pairs: list[tuple[Query, Ranking]], metrics: dict, ranker: Ranker, skipped: list[dict],
                  path: str | Path) -> Path:
    """Stage 05's artifact for stage 06: every query's full ranking, the metrics and the classifier used."""
    from .files import write_json_atomic

    data = {"classifier": str(ranker.labels.get("run_name", "")), "backbone": ranker.backbone, "metrics": metrics,
            "skipped": skipped,
            "queries": [{"id": q.id, "file": str(q.path), "lora": q.lora, "how": q.how, "rank_of_correct": r.rank_of(q.lora),
                         **r.as_dict()} for q, r in pairs]}
    write_json_atomic(data, path)
    return Path(path)


def lora_sample_files(cfg: dict, set_name: str = "variety", n: int = 1, fallback: bool = False) -> dict[str, tuple]:
    """Stage 01's images of ``n`` base images spread over ``set_name`` (the same ones for every LoRA), from its
    manifest: {slug: ([image files that exist], the LoRA's file name)}. ``fallback``: use the first set stage 01
    made images of when ``set_name`` has none.

    :raises FileNotFoundError: stage 01 has not run; ``KeyError`` / ``ValueError``: no such set, no images."""
    synth = layout.synth_dir(cfg)
    man = layout.read_synth_manifest(synth)
    sets = {k: v for k, v in man["sets"].items() if v}
    if fallback and set_name not in sets:
        set_name = next(iter(sets), None)
        if set_name is None:
            raise ValueError("stage 01 made no images")
    ids = man["sets"][set_name]
    n = min(int(n), len(ids))
    pick = [ids[(i * len(ids)) // n] for i in range(n)] if n else []
    out = {}
    for e in man["loras"]:
        paths = [layout.synth_image(synth, set_name, e["slug"], i) for i in pick]
        out[e["slug"]] = ([q for q in paths if q.is_file()], str(e.get("file", "")))
    return out


def lora_samples(cfg: dict, set_name: str = "variety") -> dict[str, Image.Image]:
    """One stage-01 image per LoRA (the same base image for all: the set's first), to show what each LoRA paints."""
    return {slug: Image.open(paths[0]).convert("RGB") for slug, (paths, _) in lora_sample_files(cfg, set_name).items()}


def example_rows(pairs: list[tuple[Query, Ranking]], samples: dict[str, Image.Image], n: int = 6, k: int = 5) -> list[dict]:
    """Rows for :func:`lorafind_utils.figures.retrieval_figure`: ``n`` queries spread over the set."""
    idx = np.unique(np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int))
    rows = []
    for i in idx:
        q, r = pairs[i]
        rows.append({"query": load_rgb(q.path), "label": f"Image{i + 1}\n({r.names[r.rank_of(q.lora) - 1]}, rank {r.rank_of(q.lora)})",
                     "correct": q.lora, "top": [(s, nm, sc, samples[s]) for s, nm, sc in r.top(k)]})
    return rows
