"""The faiss index kinds behind the style index (flat, HNSW, IVF), their parameters and which kind a
catalog of n entries gets."""
from __future__ import annotations

import math

import faiss
import numpy as np

try:  # POSIX only; elsewhere saves are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

KINDS = ("flat", "hnsw", "ivf")


# HNSW graph degree (the brief and faiss's usual default); efConstruction/efSearch were picked
# from lorafind_utils.bench.index_scale: recall@10 >= 0.95 on clustered prototypes up to 100k.
HNSW_M = 32


HNSW_EF_CONSTRUCTION = 80


HNSW_EF_SEARCH = 128


def ivf_params(n: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` of an IVF index over ``n`` vectors.

    ``nlist ≈ 4·sqrt(n)`` (at most ``n``, so k-means has a point per centroid) and
    ``nprobe ≈ nlist / 16`` (at least 8): probing ~6% of the lists kept recall@10 >= 0.95
    on clustered prototypes in :mod:`lorafind_utils.bench.index_scale`.

    :param n: number of vectors the index is trained on.
    """
    nlist = max(1, min(int(n), int(round(4 * math.sqrt(max(int(n), 1))))))
    nprobe = min(nlist, max(8, int(math.ceil(nlist / 16))))
    return nlist, nprobe


def build_faiss_index(kind: str, vectors: np.ndarray, ids: np.ndarray, *, hnsw_m: int = HNSW_M,
                      ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH,
                      nlist: int | None = None, nprobe: int | None = None) -> faiss.Index:
    """A faiss index of the given kind holding ``vectors`` under ``ids`` (inner product).

    Flat and HNSW come wrapped in ``IndexIDMap2``; IVF is a bare ``IndexIVFFlat``, which keeps
    ids itself (see the comment in the body).

    :param kind: ``"flat"``, ``"hnsw"`` or ``"ivf"``.
    :param vectors: float32 ``(n, dim)`` unit vectors.
    :param ids: int64 ``(n,)`` ids.
    :param hnsw_m: HNSW graph degree.
    :param ef_construction: HNSW build beam width.
    :param ef_search: HNSW search beam width.
    :param nlist: IVF list count; default from :func:`ivf_params`.
    :param nprobe: IVF lists probed per query; default from :func:`ivf_params`.
    :return: the filled index (an IVF index is trained on ``vectors``; with no vectors it cannot
        be, and an untrained one is returned).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    dim = vectors.shape[1]
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = ef_construction
        inner.hnsw.efSearch = ef_search
    elif kind == "ivf":
        d_nlist, d_nprobe = ivf_params(len(vectors))
        nlist = nlist or d_nlist
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.nprobe = min(nlist, nprobe or d_nprobe)
        inner.cp.spherical = True  # unit-norm centroids suit inner-product assignment
        inner.cp.min_points_per_centroid = 1  # small catalogs: no "provide more points" warning
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    if kind == "ivf":
        # IVF stores the ids in its lists itself. No IndexIDMap2 around it: that map's remove_ids
        # assumes the wrapped index renumbers what is left (as a flat index does) and IVF does not,
        # so ids would come back wrong after a remove.
        index = inner
        if len(vectors) == 0:
            return index
        index.train(vectors)
    else:
        index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index


def kind_of(index: faiss.Index) -> str | None:
    """The kind of an index built by :func:`build_faiss_index`, or None if it is not one."""
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(index.index)
    for kind, cls in (("hnsw", faiss.IndexHNSWFlat), ("flat", faiss.IndexFlatIP)):
        if isinstance(inner, cls):
            return kind
    return None


def stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id held by an index of :func:`build_faiss_index` (any order)."""
    if isinstance(index, faiss.IndexIVF):
        lists = index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(index.nlist) if lists.list_size(i)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return faiss.vector_to_array(index.id_map) if index.ntotal else np.zeros(0, np.int64)


FLAT_MAX_N = 50_000


APPROX_KIND = "hnsw"


REFERENCE_DIM = 512  # FLAT_MAX_N holds for this dim; larger embeddings scale it down


def choose_kind(n: int, dim: int | None = None) -> str:
    """The index type for a catalog of ``n`` prototypes: ``"flat"`` while exact search is fast enough.

    Rule: flat up to ``FLAT_MAX_N`` = 50k entries at dim 512, scaled by ``512/dim`` for larger
    embeddings (flat search cost is ``n·dim``: 20k at dim 1280), ``APPROX_KIND`` = HNSW above.

    Measured with :func:`bench_index` (clustered prototypes, 200 queries, one faiss thread,
    2-core shared x86 VM, faiss-cpu 1.15.1), single-query flat p50:

    ========  =========  ==========
    n         dim 512    dim 1280
    ========  =========  ==========
    1,000     0.037 ms   0.077 ms
    10,000    0.42 ms    1.9 ms
    100,000   11.5 ms    23.5 ms
    ========  =========  ==========

    Once the vectors outgrow the CPU caches, flat latency is linear in ``n·dim``, so it crosses
    the ``FLAT_P50_BUDGET_MS`` = 10 ms budget near 87k entries at dim 512 and 43k at dim 1280.
    The threshold sits at about half of that (≈ 5-6 ms expected) to leave room for slower
    machines and for the query's own embedding time. Above it, at 100k, HNSW (M=32,
    efConstruction=80, efSearch=128) had recall@10 0.997 / 0.999 at 0.24 / 0.38 ms p50, IVF
    (nlist=1265, nprobe=80) 1.000 at 0.82 / 2.1 ms. Both meet recall@10 >= 0.95; HNSW is
    chosen because its latency grows ~log n while IVF's (nprobe ∝ nlist scans a fixed ~6% of
    the vectors) grows linearly and extrapolates to ~8 / ~20 ms at 1M. The price: HNSW cannot
    remove, so a remove or replace rebuilds it (22 s / 45 s at 100k on one thread, done lazily
    at the next search or save). Below the threshold flat wins: exact, no build, cheap removes.

    :param n: number of entries.
    :param dim: embedding dimension; None means 512 (the reference).
    """
    limit = FLAT_MAX_N * REFERENCE_DIM / max(int(dim or REFERENCE_DIM), REFERENCE_DIM)
    return "flat" if int(n) <= limit else APPROX_KIND
