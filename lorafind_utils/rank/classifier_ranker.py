"""Stage 05: rank every LoRA in the catalog for style images with a trained classifier.

The classifier of stage 02 is loaded once; each query image (any common format and mode,
see :func:`lorafind_utils.core.images.load_rgb`) is centre-cropped to a square and resized to the
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

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, stage_params
from lorafind_utils.core.images import ImageError, load_rgb, square_resize, to_rgb
from lorafind_utils.models.classifier import gram_matrices, load_checkpoint, normalize, predict


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
    def from_profile(cls, cfg: dict, run_name: str | None = None, device: str = "cpu") -> Ranker:
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
        names = names or [
            str(Path(im).name) if not isinstance(im, Image.Image) else f"image {i}" for i, im in enumerate(images)
        ]
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


