"""How the LoRA style index scales: build time, size, latency and recall of flat, HNSW and IVF.

:func:`bench_index` builds each faiss index type exactly as :class:`lorafind_utils.rank.style_index.StyleIndex`
does (:func:`lorafind_utils.rank.faiss_kinds.build_faiss_index`) over synthetic, *clustered* unit
prototypes (real style prototypes cluster by genre and artist; uniform noise on the sphere would
make every neighbour equally far and flatter the approximate indexes' recall), and measures

* ``build_s``: wall time of building (and for IVF training) the index;
* ``memory_bytes``: length of ``faiss.serialize_index`` of it (≈ its RAM and its index.faiss);
* ``p50_ms`` / ``p90_ms``: latency of one query per ``search`` call, after a warm-up, on one
  faiss thread (``faiss.omp_set_num_threads(1)``), and ``p50_vs_flat``: that p50 over the flat
  index's p50 at the same size;
* ``recall_at_k``: mean overlap of the index's top-k with the exact (flat) top-k, for queries
  drawn fresh from the same mixture (near the data, but not copies of it).

:func:`choose_kind` turns the measurements into a rule (see its docstring), used by
``StyleIndex.create(kind="auto")``. Run it as
``nice -n 19 python -m lorafind_utils.bench.index_scale --dims 512 1280 --out figures/index_bench``.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from lorafind_utils.rank.faiss_kinds import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, build_faiss_index, ivf_params
from lorafind_utils.rank.style_index import KINDS


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class ClusteredPrototypes:
    """A seeded two-level mixture on the unit sphere: genres, and ~sqrt(n) style clusters within them.

    Like CLIP-style embeddings, all vectors share a common direction ``m`` (two random prototypes
    have cosine ≈ 0.27 and two cluster centres ≈ 0.38, not 0), centres of one genre are closer to
    each other (≈ 0.6) than to other genres, and each cluster spreads in its own low-rank subspace: a point is
    ``normalise(centre + spread·(z @ B) + noise·g/sqrt(dim))`` with ``z ~ N(0, I/rank)`` and ``B``
    ``rank`` random unit directions (cosine to its centre ≈ 0.82). Cluster sizes are uneven
    (gamma weights). Genres and shared direction make it harder for IVF/HNSW than separated blobs.

    :param dim: embedding dimension.
    :param n_clusters: number of style clusters.
    :param seed: random seed.
    :param n_genres: number of genres; default ``ceil(sqrt(n_clusters))``.
    :param common: weight of the shared direction (``common²`` ≈ cosine of unrelated prototypes).
    :param genre_spread: spread of cluster centres around their genre.
    :param rank: dimension of each cluster's subspace.
    :param spread: scale of the within-cluster, in-subspace offsets.
    :param noise: scale of the isotropic noise.
    """

    def __init__(self, dim: int, n_clusters: int, seed: int = 0, n_genres: int | None = None, common: float = 0.6,
                 genre_spread: float = 1.25, rank: int = 16, spread: float = 0.6, noise: float = 0.35):
        rng = np.random.default_rng(seed)
        self.dim, self.rank, self.spread, self.noise = dim, rank, spread, noise
        n_genres = n_genres or int(math.ceil(math.sqrt(n_clusters)))
        m = _normalise(rng.standard_normal((1, dim), dtype=np.float32))
        genres = _normalise(rng.standard_normal((n_genres, dim), dtype=np.float32))
        own = _normalise(genres[rng.integers(0, n_genres, n_clusters)]
                         + genre_spread * _normalise(rng.standard_normal((n_clusters, dim), dtype=np.float32)))
        self.centres = _normalise(common * m + math.sqrt(1 - common ** 2) * own)
        self.bases = _normalise(rng.standard_normal((n_clusters * rank, dim), dtype=np.float32)).reshape(
            n_clusters, rank, dim)
        w = rng.gamma(2.0, size=n_clusters)
        self.weights = w / w.sum()

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` float32 unit vectors from the mixture.

        :param n: how many.
        :param seed: random seed of this draw.
        """
        rng = np.random.default_rng(seed)
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        out = np.empty((n, self.dim), dtype=np.float32)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(self.centres) + 1))
        for c in range(len(self.centres)):  # one cluster at a time keeps the temporaries small
            rows = order[bounds[c]:bounds[c + 1]]
            if not len(rows):
                continue
            z = rng.standard_normal((len(rows), self.rank), dtype=np.float32) / np.sqrt(self.rank)
            g = rng.standard_normal((len(rows), self.dim), dtype=np.float32)
            out[rows] = self.centres[c] + self.spread * (z @ self.bases[c]) + (self.noise / np.sqrt(self.dim)) * g
        return _normalise(out)


def clustered_prototypes(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, ClusteredPrototypes]:
    """``n`` clustered unit prototypes (``round(sqrt(n))`` clusters) and the mixture they came from.

    :param n: number of prototypes.
    :param dim: embedding dimension.
    :param seed: random seed.
    """
    mix = ClusteredPrototypes(dim, max(1, int(round(math.sqrt(n)))), seed=seed)
    return mix.sample(n, seed + 1), mix


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k ids) that ``found`` also holds (-1 = none)."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def _latencies_ms(index: faiss.Index, queries: np.ndarray, k: int, warmup: int = 10) -> np.ndarray:
    for q in queries[:warmup]:
        index.search(q[None, :], k)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def bench_index(sizes: Iterable[int] = (1_000, 10_000, 100_000, 1_000_000), dim: int = 512, n_queries: int = 200,
                k: int = 10, kinds: Iterable[str] = KINDS, seed: int = 0, log: Callable[[str], None] = print,
                build_threads: int = 1, max_bytes: float = 4e9, max_build_s: float | None = None) -> list[dict]:
    """Benchmark each index type at each catalog size.

    :param sizes: catalog sizes.
    :param dim: embedding dimension.
    :param n_queries: queries per size (for latency and recall).
    :param k: neighbours per query (recall@k).
    :param kinds: index types; flat is always built, as the ground truth and latency baseline.
    :param seed: random seed (data and queries).
    :param log: progress lines go here.
    :param build_threads: faiss threads while building (searches always run on one thread).
    :param max_bytes: skip a size whose vectors, flat index and one more index would take more.
    :param max_build_s: skip the approximate kinds at larger sizes once one build took longer.
    :return: one dict per (size, kind): n, dim, kind, build_s, memory_bytes, p50_ms, p90_ms,
        p50_vs_flat, recall_at_k, params.
    """
    kinds = [kk for kk in kinds if kk != "flat"]
    rows: list[dict] = []
    threads_before = faiss.omp_get_max_threads()
    too_slow: set[str] = set()
    try:
        for n in sizes:
            need = 3 * n * dim * 4
            if need > max_bytes:
                log(f"[bench] n={n} dim={dim}: skipped, needs ~{need / 1e9:.1f} GB > {max_bytes / 1e9:.1f} GB")
                continue
            data, mix = clustered_prototypes(n, dim, seed)
            queries = mix.sample(n_queries, seed + 2)
            ids = np.arange(n, dtype=np.int64)
            kk = min(k, n)

            faiss.omp_set_num_threads(build_threads)
            t0 = time.perf_counter()
            flat = build_faiss_index("flat", data, ids)
            flat_build = time.perf_counter() - t0
            faiss.omp_set_num_threads(1)
            _, truth = flat.search(queries, kk)
            flat_lat = _latencies_ms(flat, queries, kk)
            flat_p50 = float(np.median(flat_lat))
            rows.append(_row(n, dim, "flat", flat_build, flat, flat_lat, flat_p50, 1.0, {}))
            log(_fmt(rows[-1]))
            for kind in kinds:
                if kind in too_slow:
                    log(f"[bench] n={n} dim={dim} {kind}: skipped, a smaller build took over {max_build_s} s")
                    continue
                faiss.omp_set_num_threads(build_threads)
                t0 = time.perf_counter()
                index = build_faiss_index(kind, data, ids)
                build = time.perf_counter() - t0
                faiss.omp_set_num_threads(1)
                _, found = index.search(queries, kk)
                lat = _latencies_ms(index, queries, kk)
                if kind == "hnsw":
                    params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
                else:
                    nlist, nprobe = ivf_params(n)
                    params = {"nlist": nlist, "nprobe": nprobe}
                rows.append(_row(n, dim, kind, build, index, lat, flat_p50, recall_at_k(found, truth), params))
                log(_fmt(rows[-1]))
                del index
                if max_build_s is not None and build > max_build_s:
                    too_slow.add(kind)
            del flat, data
    finally:
        faiss.omp_set_num_threads(threads_before)
    return rows


def _row(n: int, dim: int, kind: str, build_s: float, index: faiss.Index, lat: np.ndarray, flat_p50: float,
         recall: float, params: dict) -> dict:
    p50 = float(np.median(lat))
    return {"n": n, "dim": dim, "kind": kind, "build_s": round(build_s, 3),
            "memory_bytes": int(len(faiss.serialize_index(index))),
            "p50_ms": round(p50, 4), "p90_ms": round(float(np.percentile(lat, 90)), 4),
            "p50_vs_flat": round(p50 / flat_p50, 4) if flat_p50 > 0 else float("nan"),
            "recall_at_k": round(recall, 4), "params": " ".join(f"{a}={b}" for a, b in params.items())}


def _fmt(r: dict) -> str:
    return (f"[bench] n={r['n']} dim={r['dim']} {r['kind']}: build {r['build_s']:.2f} s, "
            f"{r['memory_bytes'] / 2**20:.1f} MiB, p50 {r['p50_ms']:.3f} ms (x{r['p50_vs_flat']:.3f} of flat), "
            f"p90 {r['p90_ms']:.3f} ms, recall {r['recall_at_k']:.3f} {r['params']}")


def write_bench_table(rows: list[dict], path_stem: str | Path) -> tuple[Path, Path]:
    """Write the rows as ``<path_stem>.csv`` (pandas) and ``<path_stem>.md`` (a markdown table), atomically.

    :param rows: rows of :func:`bench_index`.
    :param path_stem: output path without suffix.
    :return: the CSV and markdown paths.
    """
    import pandas as pd

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    csv, md = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    tmp = csv.with_name(csv.name + f".tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    head = ["n", "dim", "kind", "build (s)", "size (MiB)", "p50 (ms)", "p90 (ms)", "p50 / flat", "recall@k", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['n']:,}", str(r["dim"]), r["kind"], f"{r['build_s']:.2f}", f"{r['memory_bytes'] / 2**20:.1f}",
            f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p50_vs_flat']:.3f}", f"{r['recall_at_k']:.3f}",
            r["params"]]) + " |")
    tmp = md.with_name(md.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    return csv, md


def main(argv: list[str] | None = None) -> None:
    """``python -m lorafind_utils.bench.index_scale``: run :func:`bench_index` for each dim and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1280])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=4.0)
    ap.add_argument("--out", default="figures/index_bench")
    a = ap.parse_args(argv)
    rows = []
    for dim in a.dims:
        rows += bench_index(a.sizes, dim, a.queries, a.k, a.kinds, a.seed, build_threads=a.build_threads,
                            max_bytes=a.max_gb * 1e9)
    csv, md = write_bench_table(rows, a.out)
    print(f"wrote {csv} and {md}")


if __name__ == "__main__":
    main()
