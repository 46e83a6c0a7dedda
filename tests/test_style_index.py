"""Tests of the faiss-backed LoRA style index (lorafind_utils.rank.style_index) and its benchmark helpers."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from lorafind_utils.bench.index_scale import bench_index, clustered_prototypes, recall_at_k, write_bench_table
from lorafind_utils.rank import faiss_kinds, style_index
from lorafind_utils.rank.faiss_kinds import choose_kind
from lorafind_utils.rank.style_index import (
    INDEX_FILE,
    META_FILE,
    VECTORS_FILE,
    IndexEntryExists,
    IndexFileError,
    StyleIndex,
    UnknownEntry,
)

DIM = 32
ENC = {"name": "clip-test", "backbone": "vit-b32", "dim": DIM, "sha256": "a" * 64}


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # the machine is shared; small indexes gain nothing from threads
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def filled(kind="flat", n=50, seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim))
    ix = StyleIndex.create(dim, {**ENC, "dim": dim}, kind=kind)
    for i, v in enumerate(vecs):
        ix.add(f"lora-{i}", v, {"short": f"L{i}", "source": "synthesized", "n_images": 4})
    return ix, vecs


def test_search_returns_true_neighbours_with_exact_scores():
    ix, vecs = filled(n=60)
    q = np.random.default_rng(1).standard_normal((5, DIM))
    got = ix.search(q, 7)
    want = unit(q) @ unit(vecs).T  # cosine = inner product of unit vectors
    for row, scores in zip(got, want):
        order = np.argsort(-scores)[:7]
        assert [n for n, _ in row] == [f"lora-{i}" for i in order]
        np.testing.assert_allclose([s for _, s in row], scores[order], atol=1e-5)
    # a stored vector is its own best match with score 1
    (name, score), = ix.search(vecs[17] * 3.0, 1)[0]
    assert name == "lora-17" and score == pytest.approx(1.0, abs=1e-5)


def test_add_normalises_and_rejects_bad_vectors():
    ix = StyleIndex.create(DIM, ENC)
    ix.add("a", np.full(DIM, 2.0))
    assert np.linalg.norm(ix.entry("a").vector) == pytest.approx(1.0, abs=1e-6)
    for bad, msg in [(np.ones(DIM + 1), "dimension"), (np.r_[np.nan, np.ones(DIM - 1)], "non-finite"),
                     (np.zeros(DIM), "zero vector")]:
        with pytest.raises(ValueError, match=msg):
            ix.add("b", bad)
    with pytest.raises(ValueError, match="slug"):
        ix.add("not a slug", np.ones(DIM))
    with pytest.raises(ValueError, match="source"):
        ix.add("c", np.ones(DIM), {"source": "internet"})
    assert ix.names() == ["a"] and ix.entry("a").meta["added"]


def test_ids_stable_across_remove_add_and_save_load(tmp_path):
    ix, _ = filled(n=5)
    before = ix.ids()
    assert before == {f"lora-{i}": i for i in range(5)}
    ix.remove("lora-4")  # the highest id: it must still not come back
    assert ix.add("new", np.ones(DIM)) == 5
    assert ix.ids() == {**{k: v for k, v in before.items() if k != "lora-4"}, "new": 5}
    ix.save(tmp_path / "idx")
    back = StyleIndex.load(tmp_path / "idx")
    assert back.ids() == ix.ids() and back.next_id == 6
    assert back.add("newer", -np.ones(DIM)) == 6
    assert back.entry("lora-2").meta["short"] == "L2"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_removed_entry_is_never_returned(kind, tmp_path):
    ix, vecs = filled(kind, n=80)
    assert ix.search(vecs[10], 1)[0][0][0] == "lora-10"
    ix.remove("lora-10")
    hits = ix.search(vecs[10], len(ix))[0]
    assert "lora-10" not in [n for n, _ in hits]
    assert len(hits) == 79 or kind == "ivf"  # IVF only returns what its probed lists hold
    # the others still come back under their own names (ids not shifted by the remove)
    for i in (0, 9, 11, 79):
        assert ix.search(vecs[i], 1)[0][0] == (f"lora-{i}", pytest.approx(1.0, abs=1e-5))
    assert "lora-10" not in StyleIndex.load(ix.save(tmp_path / "i")).names()


def test_unknown_name_error():
    ix, _ = filled(n=3)
    with pytest.raises(UnknownEntry, match=r"no LoRA named 'nope'.*3 entries") as e:
        ix.remove("nope")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_replace_keeps_id_and_changes_vector(kind):
    ix, vecs = filled(kind, n=40)
    with pytest.raises(IndexEntryExists, match="--replace"):
        ix.add("lora-3", vecs[5])
    assert ix.search(vecs[3], 1)[0][0][0] == "lora-3"  # the failed add changed nothing
    assert ix.add("lora-3", vecs[5], {"short": "moved"}, replace=True) == 3
    assert len(ix) == 40 and ix.entry("lora-3").meta["short"] == "moved"
    top2 = {n for n, _ in ix.search(vecs[5], 2)[0]}
    assert top2 == {"lora-3", "lora-5"}  # both now hold the same vector
    np.testing.assert_allclose(ix.entry("lora-3").vector, unit(vecs[5]), atol=1e-6)


def test_empty_index_and_k_clipping():
    ix = StyleIndex.create(DIM, ENC)
    assert ix.search(np.ones((2, DIM)), 5) == [[], []]
    ix.add("only", np.ones(DIM))
    assert [n for n, _ in ix.search(np.ones(DIM), 10)[0]] == ["only"]
    with pytest.raises(ValueError, match="k must be"):
        ix.search(np.ones(DIM), 0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip_identical(kind, tmp_path):
    ix, _ = filled(kind, n=120)
    q = np.random.default_rng(3).standard_normal((10, DIM))
    folder = ix.save(tmp_path / "idx")
    assert sorted(os.listdir(folder)) == [INDEX_FILE, META_FILE, VECTORS_FILE]
    back = StyleIndex.load(folder, expect_encoder=ENC)
    assert back.built_kind == kind and back.kind == kind
    assert back.search(q, 5) == ix.search(q, 5)
    np.testing.assert_array_equal(back.vectors(), ix.vectors())
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["encoder"] == ENC and meta["dim"] == DIM and meta["variant"] == "prototype"
    # index.faiss is faiss's binary format, not a pickle
    assert faiss.read_index(str(folder / INDEX_FILE)).ntotal == 120


def saved(tmp_path, n=20):
    ix, _ = filled(n=n)
    return ix.save(tmp_path / "idx")


def test_truncated_index_faiss(tmp_path):
    folder = saved(tmp_path)
    data = (folder / INDEX_FILE).read_bytes()
    (folder / INDEX_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match=r"index\.faiss.*sha256.*lorafind index build --profile"):
        StyleIndex.load(folder)


def test_unreadable_index_faiss_with_matching_hash(tmp_path):
    folder = saved(tmp_path)
    (folder / INDEX_FILE).write_bytes(b"not a faiss index at all")
    rehash(folder, INDEX_FILE)  # past the hash check: faiss itself must fail
    with pytest.raises(IndexFileError, match=r"index\.faiss: faiss could not read it") as e:
        StyleIndex.load(folder, profile="paper")
    assert "--profile paper" in str(e.value)


def test_garbage_index_json(tmp_path):
    folder = saved(tmp_path)
    (folder / META_FILE).write_text("{ this is not json")
    with pytest.raises(IndexFileError, match=r"index\.json: not valid JSON"):
        StyleIndex.load(folder)
    (folder / META_FILE).write_text(json.dumps({"format": "lorafind-style-index", "version": 1}))
    with pytest.raises(IndexFileError, match=r"index\.json: missing or malformed"):
        StyleIndex.load(folder)


class Boom:
    """Unpickling this would flip the flag: proof that load never unpickles."""

    unpickled = False

    def __setstate__(self, state):
        Boom.unpickled = True


def rehash(folder, name):
    import hashlib

    meta = json.loads((folder / META_FILE).read_text())
    meta["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))


def test_pickled_vectors_npy_is_refused(tmp_path):
    folder = saved(tmp_path)
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Boom(), {"x": 1}
    np.save(folder / VECTORS_FILE, arr, allow_pickle=True)
    with pytest.raises(IndexFileError, match=r"vectors\.npy: content does not match the sha256"):
        StyleIndex.load(folder)
    rehash(folder, VECTORS_FILE)  # even with a matching hash, np.load(allow_pickle=False) refuses it
    with pytest.raises(IndexFileError, match=r"vectors\.npy: not a plain numeric \.npy array"):
        StyleIndex.load(folder)
    assert not Boom.unpickled


def test_missing_folder_or_file(tmp_path):
    with pytest.raises(IndexFileError, match="folder missing"):
        StyleIndex.load(tmp_path / "nothing")
    folder = saved(tmp_path)
    (folder / VECTORS_FILE).unlink()
    with pytest.raises(IndexFileError, match=r"vectors\.npy: file missing"):
        StyleIndex.load(folder)


def test_encoder_and_dim_mismatch(tmp_path):
    folder = saved(tmp_path)
    other = {**ENC, "name": "dinov2-test", "sha256": "b" * 64}
    with pytest.raises(IndexFileError) as e:
        StyleIndex.load(folder, expect_encoder=other)
    msg = str(e.value)
    assert "index built with encoder" in msg and "'clip-test'" in msg and "this model is" in msg
    assert "'dinov2-test'" in msg and "differs in: name, sha256" in msg and "backbone" not in msg.split("differs")[1]
    with pytest.raises(IndexFileError, match="dim mismatch: index has dim 32"):
        StyleIndex.load(folder, expect_dim=64)
    assert len(StyleIndex.load(folder, expect_encoder={"name": "clip-test", "dim": DIM})) == 20


@pytest.mark.parametrize("target", ["faiss.write_index", "numpy.save"])
def test_crash_mid_save_keeps_previous(target, tmp_path, monkeypatch):
    ix, _ = filled(n=10)
    folder = ix.save(tmp_path / "idx")
    ix.remove("lora-0")
    ix.add("extra", np.ones(DIM))

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(target, crash)
    with pytest.raises(OSError, match="simulated"):
        ix.save(folder)
    monkeypatch.undo()
    back = StyleIndex.load(folder)
    assert back.names() == [f"lora-{i}" for i in range(10)]
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", "idx"]  # no half-written generation left behind
    assert "extra" in StyleIndex.load(ix.save(folder)).names()


def test_failed_second_rename_puts_old_folder_back(tmp_path, monkeypatch):
    ix, _ = filled(n=10)
    folder = ix.save(tmp_path / "idx")
    ix.add("extra", np.ones(DIM))
    real, calls = os.replace, []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old folder moved aside, new one not yet moved in
            raise OSError("rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="simulated"):
        ix.save(folder)
    monkeypatch.undo()
    assert len(StyleIndex.load(folder)) == 10
    assert sorted(os.listdir(tmp_path)) == [".idx.lock", "idx"]


def test_crash_between_folder_renames_reads_old_then_recovers(tmp_path):
    ix, _ = filled(n=10)
    folder = ix.save(tmp_path / "idx")
    ix.add("extra", np.ones(DIM))
    # the state a process killed between the two renames leaves: old generation aside, new one complete
    os.rename(folder, tmp_path / ".idx.prev-0123456789ab")
    ix.save(tmp_path / "other")
    os.rename(tmp_path / "other", tmp_path / ".idx.saving-0123456789ab")
    old = StyleIndex.load(folder)
    assert len(old) == 10 and "extra" not in old.names()
    ix.save(folder)  # puts the old one back, swaps the new one in, removes the leftovers
    assert "extra" in StyleIndex.load(folder).names()
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == ["idx"]


def test_save_during_load_gives_new_index_not_a_mix(tmp_path, monkeypatch):

    old, _ = filled(n=10)
    folder = old.save(tmp_path / "idx")
    new, _ = filled(n=12, seed=7)
    real, calls = style_index.parse_meta, []

    def parse_then_swap(*a, **k):
        meta = real(*a, **k)
        calls.append(1)
        if len(calls) == 1:  # a writer replaces the folder after this reader read the old index.json
            new.save(folder)
        return meta

    monkeypatch.setattr(style_index, "parse_meta", parse_then_swap)
    got = StyleIndex.load(folder)
    assert len(calls) == 2  # the old generation vanished under the reader, which started again
    assert got.names() == new.names()
    np.testing.assert_array_equal(got.vectors(), new.vectors())


def test_save_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    ix, _ = filled(n=3)
    with pytest.raises(ValueError, match="refusing to replace"):
        ix.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_on_clustered_prototypes(kind):
    data, mix = clustered_prototypes(3000, 64, seed=5)
    queries = mix.sample(50, 9)
    flat = StyleIndex.create(64, {"name": "x", "dim": 64})
    approx = StyleIndex.create(64, {"name": "x", "dim": 64}, kind=kind)
    names = [f"p{i}" for i in range(len(data))]
    flat.add_many(names, data)
    approx.add_many(names, data)
    truth = np.array([[int(n[1:]) for n, _ in row] for row in flat.search(queries, 10)])
    found = np.array([[int(n[1:]) for n, _ in row] for row in approx.search(queries, 10)])
    assert approx.built_kind == kind
    assert recall_at_k(found, truth) >= 0.9


def test_choose_kind_and_auto(tmp_path, monkeypatch):
    assert choose_kind(1_000) == "flat" and choose_kind(1_000, dim=1280) == "flat"
    assert choose_kind(1_000_000) == faiss_kinds.APPROX_KIND
    assert choose_kind(faiss_kinds.FLAT_MAX_N) == "flat" and choose_kind(faiss_kinds.FLAT_MAX_N + 1) != "flat"
    ix, _ = filled("auto", n=30)
    ix.search(np.ones(DIM), 1)
    assert ix.built_kind == "flat"
    monkeypatch.setattr(faiss_kinds, "FLAT_MAX_N", 20)  # as if the catalog had outgrown flat search
    back = StyleIndex.load(ix.save(tmp_path / "auto"))
    assert back.kind == "auto" and back.built_kind == faiss_kinds.APPROX_KIND


def test_bench_rows_and_table(tmp_path):
    rows = bench_index(sizes=(400,), dim=16, n_queries=20, k=5, log=lambda s: None)
    assert [r["kind"] for r in rows] == ["flat", "hnsw", "ivf"]
    flat = rows[0]
    assert flat["recall_at_k"] == 1.0 and flat["p50_vs_flat"] == 1.0 and flat["memory_bytes"] >= 400 * 16 * 4
    assert all(0.5 <= r["recall_at_k"] <= 1.0 and r["p90_ms"] >= r["p50_ms"] > 0 for r in rows)
    csv, md = write_bench_table(rows, tmp_path / "bench")
    import pandas as pd

    assert len(pd.read_csv(csv)) == 3 and md.read_text().count("\n") == 5 and "| 400 | 16 | hnsw |" in md.read_text()


def test_ivf_retrained_at_save_when_catalog_grew(tmp_path):
    ix, _ = filled("ivf", n=20)
    ix.search(np.ones(DIM), 1)  # trains on 20 vectors: nlist 18
    assert faiss.extract_index_ivf(ix._index).nlist == 18
    rng = np.random.default_rng(4)
    ix.add_many([f"more-{i}" for i in range(300)], rng.standard_normal((300, DIM)))
    back = StyleIndex.load(ix.save(tmp_path / "ivf"))
    nlist = faiss.extract_index_ivf(back._index).nlist
    assert nlist == 72 and back.params["nlist"] == 72 and len(back) == 320  # 4·sqrt(320) ≈ 72
    v = back.entry("more-7").vector
    assert back.search(v, 1)[0][0] == ("more-7", pytest.approx(1.0, abs=1e-5))
