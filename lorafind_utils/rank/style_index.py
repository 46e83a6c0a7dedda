"""A persistent index of LoRA style prototypes, searched by inner product with faiss.

Each catalog entry is one L2-normalised float32 vector, the *prototype* of a LoRA (the normalised
mean of the embeddings of images it painted), plus a small metadata dict. The index ranks
entries for a query embedding by cosine similarity (inner product of unit vectors).

Index types (``kind``):

* ``"flat"`` (default): ``IndexIDMap2(IndexFlatIP(dim))``, exact; add and remove are cheap.
* ``"hnsw"``: ``IndexIDMap2(IndexHNSWFlat(dim, 32, METRIC_INNER_PRODUCT))``, approximate and fast
  for large catalogs. HNSW cannot remove vectors, so a remove (or a replace) drops the graph and
  it is rebuilt from the stored vectors at the next search or save.
* ``"ivf"``: a bare ``IndexIVFFlat`` with inner product (it keeps ids itself and removes by id;
  an ``IndexIDMap2`` around it would mislabel results after a remove), ``nlist ≈ 4·sqrt(n)`` spherical
  k-means centroids trained on the stored vectors, ``nprobe`` from :func:`ivf_params`. It is
  trained lazily (first search or save) and retrained at save time when the catalog has grown or
  shrunk enough that ``nlist`` is off by more than 2x.
* ``"auto"``: decided by :func:`~lorafind_utils.rank.faiss_kinds.choose_kind` (measured by
  :mod:`lorafind_utils.bench.index_scale`) on the number of entries
  whenever the faiss index is built: at the first search, at :meth:`StyleIndex.build`, and
  again at every :meth:`StyleIndex.save` (so a growing catalog switches from flat to an
  approximate index when it is saved past the threshold).

The raw vectors are always kept, so any index type can be rebuilt from them.

Ids are int64, assigned from ``next_id`` (kept in the metadata) and never reused after a remove;
a replace keeps the entry's id (the id names the LoRA, the vector is its current prototype).

On disk, ``folder/`` holds three files:

* ``index.faiss``: ``faiss.write_index`` of the faiss index (faiss's own binary format);
* ``vectors.npy``: the float32 ``(n, dim)`` prototypes, row ``i`` belonging to ``entries[i]``
  of index.json (read with ``allow_pickle=False``; nothing here ever uses pickle);
* ``index.json``: format, version, dim, kind, built kind, variant, encoder, next_id, the search
  parameters, ``entries`` (name, id, meta) and the sha256 and size of the other two files.

Atomicity (scheme: *folder swap*). :meth:`StyleIndex.save` writes all three files into a new
sibling folder ``.<name>.saving-<token>/``, fsyncs them, then swaps folders with two renames
(``os.replace`` cannot rename a folder over a non-empty one): ``folder -> .<name>.prev-<token>``
then ``.<name>.saving-<token> -> folder``, and finally deletes the ``prev`` folder. Files are
never modified in place, so every folder that ever carries the name holds one consistent
generation. A crash

* before the swap leaves ``folder`` untouched (the ``saving`` leftover is removed by the next
  save);
* between the two renames leaves no ``folder`` but a complete ``prev`` folder: :meth:`load`
  then reads that (the old index), and the next save puts it back before going on;
* after the swap leaves the new index in place (a ``prev`` leftover is removed by the next save).

A reader opens the folder once and reads the three files relative to that open folder
(``dir_fd``), so a swap during a load cannot hand it files of two generations; if the writer
deletes the old generation under it, the load starts again on the new one. The sha256 of
index.faiss and vectors.npy stored in index.json catch anything else (a truncated, edited or
copied-over file). Saves of one folder are serialised with an ``flock`` on
``.<name>.lock`` beside it (POSIX); readers take no lock.

A save writes the whole index it holds: a load -> change -> save by two processes at once would
lose the first one's change. Whoever changes a shared index holds one lock from the load to the
save and loads under it (:func:`lorafind_utils.rank.index_ops.index_lock`); a long-lived reader never saves.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lorafind_utils.core.files import sha256_file
from lorafind_utils.rank.faiss_kinds import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    KINDS,
    build_faiss_index,
    choose_kind,
    ivf_params,
    kind_of,
    stored_ids,
)
from lorafind_utils.rank.index_storage import (
    FORMAT,
    INDEX_FILE,
    META_FILE,
    SOURCES,
    VARIANTS,
    VECTORS_FILE,
    VERSION,
    IndexFileError,
    Vanished,
    check_encoder,
    fsync,
    open_dir,
    parse_meta,
    previous_generation,
    recover,
    replaceable,
    save_lock,
)

try:  # POSIX only; elsewhere saves are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class IndexEntryExists(ValueError):
    """``add`` of a name that is already in the index, without ``replace=True``."""


class UnknownEntry(KeyError, ValueError):
    """A name that is not in the index (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class IndexEntry:
    """One catalog entry as stored: its name (slug), stable id, metadata and unit vector."""

    name: str
    id: int
    meta: dict = field(default_factory=dict)
    vector: np.ndarray | None = None


def _unit_rows(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` as a float32 ``(n, dim)`` array of unit rows; ValueError for wrong shape, non-finite or zero rows."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what} must have dimension {dim}, got shape {np.shape(x)}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise ValueError(f"{what} row {bad} has non-finite values (NaN or inf)")
    norms = np.linalg.norm(a, axis=1)
    if (norms <= 1e-12).any():
        raise ValueError(f"{what} row {int(np.flatnonzero(norms <= 1e-12)[0])} is a zero vector; it has no direction")
    return np.ascontiguousarray(a / norms[:, None], dtype=np.float32)


def _check_json(obj: Any, what: str) -> None:
    """ValueError unless ``obj`` survives a JSON round trip (it goes into index.json)."""
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StyleIndex:
    """LoRA prototypes searchable by inner product; see the module docstring for kinds and files.

    Build one with :meth:`create` or :meth:`load`; the constructor is internal.
    """

    def __init__(self, dim: int, encoder: dict, kind: str = "flat", variant: str = "prototype", *,
                 next_id: int = 0, params: dict | None = None, created: str | None = None):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if kind not in KINDS + ("auto",):
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS + ('auto',)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if not isinstance(encoder, dict) or not encoder:
            raise ValueError(
                "encoder must be a non-empty dict that identifies the encoder (name, backbone, dim, sha256, …)"
            )
        _check_json(encoder, "encoder")
        if "dim" in encoder and encoder["dim"] != dim:
            raise ValueError(f"encoder says dim {encoder['dim']} but the index has dim {dim}")
        self.dim = int(dim)
        self.encoder = dict(encoder)
        self.kind = kind
        self.variant = variant
        self.next_id = int(next_id)
        self.created = created or _now()
        self.params = {"hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH,
                       **(params or {})}
        # Rows in insertion order; the buffer grows geometrically so one-by-one adds stay O(1).
        self._vecs = np.zeros((16, self.dim), dtype=np.float32)
        self._ids = np.zeros(16, dtype=np.int64)
        self._names: list[str] = []
        self._row: dict[str, int] = {}
        self._meta: dict[str, dict] = {}
        self._name_of_id: dict[int, str] = {}
        self._index: faiss.Index | None = None  # None: (re)build from the vectors when needed
        self._built_kind: str | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, dim: int, encoder: dict, kind: str = "flat", variant: str = "prototype") -> StyleIndex:
        """An empty index.

        :param dim: embedding dimension.
        :param encoder: identifies the encoder whose embeddings go in (name, backbone, dim, checkpoint
            sha256, …); :meth:`load` can insist on it.
        :param kind: ``"flat"``, ``"hnsw"``, ``"ivf"`` or ``"auto"`` (chosen by size when built).
        :param variant: what the vectors are: ``"prototype"`` or ``"content_cancelled"``.
        """
        return cls(dim, encoder, kind, variant)

    # ----------------------------------------------------------------- contents
    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._row

    def names(self) -> list[str]:
        """Entry names in insertion order."""
        return list(self._names)

    @property
    def built_kind(self) -> str | None:
        """The kind of faiss index currently built (``kind``, or what ``auto`` chose); None if none is."""
        return self._built_kind if self._index is not None else None

    def vectors(self) -> np.ndarray:
        """A copy of the stored unit vectors, one row per entry in :meth:`names` order."""
        return self._vecs[: len(self)].copy()

    def ids(self) -> dict[str, int]:
        """``{name: id}`` of every entry."""
        return {n: int(self._ids[r]) for n, r in self._row.items()}

    def entry(self, name: str) -> IndexEntry:
        """The stored entry ``name`` (copies: changing them does not change the index)."""
        r = self._lookup(name)
        return IndexEntry(name, int(self._ids[r]), json.loads(json.dumps(self._meta[name])), self._vecs[r].copy())

    def _lookup(self, name: str) -> int:
        try:
            return self._row[name]
        except (KeyError, TypeError):
            raise UnknownEntry(f"no LoRA named {name!r} in this index ({len(self)} entries"
                               + (f", e.g. {', '.join(self._names[:3])})" if self._names else ")")) from None

    # ----------------------------------------------------------------- add / remove
    def add(self, name: str, vector: Any, meta: dict | None = None, replace: bool = False) -> int:
        """Add (or with ``replace``, overwrite) one LoRA's prototype.

        :param name: unique key, a slug (letters, digits, ``.``, ``_``, ``-``).
        :param vector: ``(dim,)`` embedding; normalised here.
        :param meta: JSON-serialisable dict (short, file, sha256, source, n_images, …); ``added``
            defaults to now.
        :param replace: overwrite an existing entry of that name (its id is kept).
        :return: the entry's id.
        """
        return self.add_many([name], _unit_rows(vector, self.dim, f"vector for {name!r}"),
                             [meta] if meta is not None else None, replace=replace)[0]

    def add_many(self, names: Iterable[str], vectors: Any, metas: Iterable[dict | None] | None = None,
                 replace: bool = False) -> list[int]:
        """Add several entries at once (all or none: everything is checked before anything changes).

        :param names: unique slugs, one per row of ``vectors``.
        :param vectors: ``(n, dim)`` embeddings; normalised here.
        :param metas: one dict (or None) per name.
        :param replace: overwrite existing entries of those names.
        :return: the entries' ids.
        """
        names = list(names)
        vecs = _unit_rows(vectors, self.dim, "vectors") if names else np.zeros((0, self.dim), np.float32)
        if len(vecs) != len(names):
            raise ValueError(f"{len(names)} names but {len(vecs)} vectors")
        metas = list(metas) if metas is not None else [None] * len(names)
        if len(metas) != len(names):
            raise ValueError(f"{len(names)} names but {len(metas)} meta dicts")
        if len(set(names)) != len(names):
            raise ValueError("duplicate names in one add_many call")
        clean = []
        for name, meta in zip(names, metas):
            if not isinstance(name, str) or not _SLUG.match(name):
                raise ValueError(f"entry name {name!r} is not a slug (letters, digits, '.', '_', '-')")
            if name in self._row and not replace:
                raise IndexEntryExists(f"a LoRA named {name!r} is already in the index; pass --replace "
                                       "(replace=True) to overwrite it")
            meta = dict(meta or {})
            if meta.get("source") is not None and meta["source"] not in SOURCES:
                raise ValueError(f"meta source of {name!r} must be one of {SOURCES}, got {meta['source']!r}")
            meta.setdefault("added", _now())
            _check_json(meta, f"meta of {name!r}")
            clean.append(meta)

        new_rows, new_ids, replaced_ids = [], [], []
        for name, vec, meta in zip(names, vecs, clean):
            if name in self._row:  # replace: same id, new vector and meta
                r = self._row[name]
                self._vecs[r] = vec
                replaced_ids.append(int(self._ids[r]))
                new_ids.append(int(self._ids[r]))
            else:
                r = self._append_row(name, vec)
                new_rows.append(r)
                new_ids.append(int(self._ids[r]))
            self._meta[name] = meta

        if self._index is not None and not self._index.is_trained:
            self._index = None  # an IVF built while empty has no centroids yet: train it when next needed
        if self._index is not None:
            if replaced_ids:
                self._drop_from_index(replaced_ids)
            if self._index is not None:  # not dropped for a rebuild: add the new vectors in place
                rows = np.array(new_rows + [self._row[self._name_of_id[i]] for i in replaced_ids], dtype=np.int64)
                if len(rows):
                    self._index.add_with_ids(self._vecs[rows], self._ids[rows])
        return new_ids

    def _append_row(self, name: str, vec: np.ndarray) -> int:
        n = len(self._names)
        if n == len(self._vecs):
            grow = max(16, n)
            self._vecs = np.concatenate([self._vecs, np.zeros((grow, self.dim), np.float32)])
            self._ids = np.concatenate([self._ids, np.zeros(grow, np.int64)])
        self._vecs[n] = vec
        self._ids[n] = self.next_id
        self._name_of_id[self.next_id] = name
        self.next_id += 1  # never reused, even after a remove
        self._names.append(name)
        self._row[name] = n
        return n

    def remove(self, name: str) -> int:
        """Remove entry ``name``; its id is never given out again.

        :param name: the entry's name; unknown names raise :class:`UnknownEntry`.
        :return: the removed entry's id.
        """
        r = self._lookup(name)
        i = int(self._ids[r])
        n = len(self._names)
        # shift the rows after it up one, keeping insertion order
        self._vecs[r:n - 1] = self._vecs[r + 1:n]
        self._ids[r:n - 1] = self._ids[r + 1:n]
        del self._names[r]
        for j in range(r, n - 1):
            self._row[self._names[j]] = j
        del self._row[name], self._meta[name], self._name_of_id[i]
        if self._index is not None:
            self._drop_from_index([i])
        return i

    def _drop_from_index(self, ids: list[int]) -> None:
        """Remove ``ids`` from the built faiss index, or drop it for a rebuild where faiss cannot remove."""
        if self._built_kind == "hnsw":
            self._index = None  # HNSW has no remove_ids: rebuilt from the vectors when next needed
        else:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))

    # ----------------------------------------------------------------- faiss index
    def _target_kind(self) -> str:
        if self.kind != "auto":
            return self.kind

        return choose_kind(len(self), self.dim)

    def build(self) -> StyleIndex:
        """(Re)build the faiss index from the stored vectors now (``auto`` decides by size here)."""
        kind = self._target_kind()
        p = self.params
        nlist = nprobe = None
        if kind == "ivf":
            nlist, nprobe = ivf_params(len(self))
            p["nlist"], p["nprobe"] = nlist, nprobe
        self._index = build_faiss_index(kind, self._vecs[: len(self)], self._ids[: len(self)],
                                        hnsw_m=p["hnsw_m"], ef_construction=p["ef_construction"],
                                        ef_search=p["ef_search"], nlist=nlist, nprobe=nprobe)
        self._built_kind = kind
        return self

    def _index_for_search(self) -> faiss.Index:
        if self._index is None or (self._built_kind == "ivf" and not self._index.is_trained):
            self.build()
        return self._index

    def _stale(self) -> bool:
        """Whether the built index should be rebuilt before a save."""
        if self._index is None or self._built_kind != self._target_kind():
            return True
        if self._built_kind == "ivf":
            if not self._index.is_trained:
                return True
            ideal, _ = ivf_params(len(self))
            built = faiss.extract_index_ivf(self._index).nlist
            return not (0.5 <= ideal / built <= 2.0)  # centroids trained for a very different size
        return False

    # ----------------------------------------------------------------- search
    def search(self, queries: Any, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` best entries for each query, best first.

        :param queries: ``(n, dim)`` (or one ``(dim,)``) embeddings; normalised here.
        :param k: results per query, clipped to the number of entries.
        :return: one list of ``(name, inner product)`` per query; empty lists for an empty index.
        """
        q = _unit_rows(queries, self.dim, "queries")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            return [[] for _ in range(len(q))]
        k = min(int(k), len(self))
        scores, labels = self._index_for_search().search(q, k)
        names = self._name_of_id
        return [[(names[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, labels)]

    # ----------------------------------------------------------------- save
    def _metadata(self, hashes: dict) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "dim": self.dim, "kind": self.kind,
            "built_kind": self._built_kind, "variant": self.variant, "encoder": self.encoder,
            "next_id": self.next_id, "params": self.params, "created": self.created, "saved": _now(),
            "count": len(self), "files": hashes,
            "entries": [{"name": n, "id": int(self._ids[r]), "meta": self._meta[n]} for r, n in enumerate(self._names)],
        }

    def save(self, folder: str | Path) -> Path:
        """Write the index to ``folder`` atomically (folder swap, see the module docstring).

        :param folder: the index folder; created, or replaced if it already holds a style index.
        :return: ``folder``.
        """
        folder = Path(folder)
        if self._stale():
            self.build()
        folder.parent.mkdir(parents=True, exist_ok=True)
        with save_lock(folder):
            recover(folder)
            if folder.exists() and not replaceable(folder):
                raise ValueError(f"refusing to replace {folder}: it exists and does not hold a style index "
                                 f"({META_FILE} missing); choose an empty or new folder")
            token = uuid.uuid4().hex[:12]
            tmp = folder.parent / f".{folder.name}.saving-{token}"
            tmp.mkdir()
            prev, moved = folder.parent / f".{folder.name}.prev-{token}", False
            try:
                faiss.write_index(self._index, str(tmp / INDEX_FILE))
                with open(tmp / VECTORS_FILE, "wb") as f:
                    np.save(f, np.ascontiguousarray(self._vecs[: len(self)]), allow_pickle=False)
                hashes = {fn: {"sha256": sha256_file(tmp / fn), "bytes": (tmp / fn).stat().st_size}
                          for fn in (INDEX_FILE, VECTORS_FILE)}
                with open(tmp / META_FILE, "w") as f:
                    json.dump(self._metadata(hashes), f, indent=1, allow_nan=False)
                for fn in (INDEX_FILE, VECTORS_FILE, META_FILE):
                    fsync(tmp / fn)
                fsync(tmp)
                if folder.exists():
                    os.replace(folder, prev)
                    moved = True
                os.replace(tmp, folder)  # from here on readers see the new index
                fsync(folder.parent)
            except BaseException:
                if moved and not folder.exists():
                    try:  # an error (not a crash) between the renames: put the old index back
                        os.replace(prev, folder)
                    except OSError:
                        pass  # load() still reads it as the previous generation
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(prev, ignore_errors=True)
        return folder

    # ----------------------------------------------------------------- load
    @classmethod
    def load(cls, folder: str | Path, expect_encoder: dict | None = None, *, expect_dim: int | None = None,
             profile: str | None = None) -> StyleIndex:
        """Read an index saved by :meth:`save`, checking it through.

        :param folder: the index folder.
        :param expect_encoder: the encoder the caller will embed queries with; every key it has must
            match the stored encoder's (keys only the stored one has are ignored).
        :param expect_dim: the embedding dimension the caller will query with.
        :param profile: profile named in the rebuild hint of errors.
        :raise IndexFileError: missing or corrupt files, hash or dim mismatch, other encoder.
        """
        folder = Path(folder)
        for attempt in range(5):
            # A save may swap folders under us and delete the generation we opened: start again.
            try:
                return cls._load_once(folder, expect_encoder, expect_dim, profile)
            except Vanished:
                time.sleep(0.05 * (attempt + 1))
        return cls._load_once(folder, expect_encoder, expect_dim, profile, last=True)

    @classmethod
    def _load_once(cls, folder: Path, expect_encoder: dict | None, expect_dim: int | None, profile: str | None,
                   last: bool = False) -> StyleIndex:
        src = folder
        if not folder.exists():
            src = previous_generation(folder)  # a save crashed between its two renames
            if src is None:
                if not last and any(folder.parent.glob(f".{folder.name}.saving-*")):
                    raise Vanished()  # a save is swapping right now
                raise IndexFileError(folder, "no index here (folder missing)", profile)
        if not src.is_dir():
            raise IndexFileError(src, "not a folder", profile)
        with open_dir(src, last) as opener:
            meta_path = src / META_FILE
            meta = parse_meta(opener, meta_path, profile)
            dim = meta["dim"]
            if expect_encoder is not None:
                check_encoder(meta_path, meta["encoder"], expect_encoder, profile)
            if expect_dim is not None and int(expect_dim) != dim:
                raise IndexFileError(meta_path, f"dim mismatch: index has dim {dim}, this model embeds in "
                                                f"dim {expect_dim}", profile)
            n = len(meta["entries"])
            with opener(VECTORS_FILE, meta["files"][VECTORS_FILE]["sha256"], profile) as f:
                try:
                    vecs = np.load(f, allow_pickle=False)
                except ValueError as e:
                    raise IndexFileError(src / VECTORS_FILE, f"not a plain numeric .npy array ({e})", profile) from None
                except Exception as e:
                    raise IndexFileError(src / VECTORS_FILE, f"unreadable ({type(e).__name__}: {e})", profile) from None
            if not isinstance(vecs, np.ndarray) or vecs.dtype != np.float32 or vecs.shape != (n, dim):
                raise IndexFileError(src / VECTORS_FILE, f"expected float32 vectors of shape ({n}, {dim}), got "
                                                         f"{getattr(vecs, 'dtype', '?')} {getattr(vecs, 'shape', '?')}",
                                     profile)
            if n and not np.isfinite(vecs).all():
                raise IndexFileError(src / VECTORS_FILE, "holds non-finite values", profile)
            with opener(INDEX_FILE, meta["files"][INDEX_FILE]["sha256"], profile) as f:
                try:
                    index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
                except Exception as e:
                    raise IndexFileError(src / INDEX_FILE, f"faiss could not read it ({str(e).splitlines()[0][:200]})",
                                         profile) from None
        index_path = src / INDEX_FILE
        kind = kind_of(index)
        if kind is None or kind != meta["built_kind"]:
            raise IndexFileError(index_path, f"holds a {type(index).__name__} ({kind or 'unknown kind'}), but "
                                             f"{META_FILE} says {meta['built_kind']}", profile)
        if index.d != dim:
            raise IndexFileError(index_path, f"dim mismatch: faiss index has dim {index.d}, {META_FILE} says {dim}",
                                 profile)
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(index_path, "faiss index does not use the inner-product metric", profile)
        ids = np.array([e["id"] for e in meta["entries"]], dtype=np.int64)
        have = stored_ids(index)
        if index.ntotal != n or not np.array_equal(np.sort(have), np.sort(ids)):
            raise IndexFileError(index_path, f"holds {index.ntotal} vectors whose ids do not match the {n} entries "
                                             f"of {META_FILE}", profile)

        try:
            out = cls(dim, meta["encoder"], meta["kind"], meta["variant"], next_id=meta["next_id"],
                      params=meta.get("params"), created=meta.get("created"))
        except ValueError as e:
            raise IndexFileError(src / META_FILE, str(e), profile) from None
        cap = max(16, n)
        out._vecs = np.zeros((cap, dim), np.float32)
        out._vecs[:n] = vecs
        out._ids = np.zeros(cap, np.int64)
        out._ids[:n] = ids
        for r, e in enumerate(meta["entries"]):
            out._names.append(e["name"])
            out._row[e["name"]] = r
            out._meta[e["name"]] = e["meta"]
            out._name_of_id[int(e["id"])] = e["name"]
        # search parameters are serialised by faiss too; set them again so index.json is the truth
        if kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = int(out.params["ef_search"])
        elif kind == "ivf" and "nprobe" in out.params:
            faiss.extract_index_ivf(index).nprobe = int(out.params["nprobe"])
        out._index, out._built_kind = index, kind
        return out


# choose_kind's rule, from the measurements in the docstring of choose_kind.
FLAT_P50_BUDGET_MS = 10.0


