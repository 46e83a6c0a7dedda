"""'None of these' scores: CSLS discounts hubs, spread rescales loose LoRAs, the best validates."""
import numpy as np
import pytest

from lorafind_utils.rank.open_set import features, fit_calibration, hubness, match_probability
from lorafind_utils.rank.style_index import StyleIndex


def _index(vectors: dict[str, np.ndarray], self_sim: dict[str, list[float]] | None = None) -> StyleIndex:
    ix = StyleIndex.create(len(next(iter(vectors.values()))), {"kind": "test"})
    for n, v in vectors.items():
        ix.add(n, v, {"self_sim": (self_sim or {}).get(n)} if self_sim and n in self_sim else {})
    return ix


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def test_csls_discounts_an_entry_close_to_every_query():
    scores = [[("hub", 0.9), ("a", 0.5)], [("hub", 0.8), ("b", 0.7)], [("a", 0.95), ("hub", 0.85)]]
    hub = hubness(scores, k=2)
    assert hub == pytest.approx({"hub": 0.875, "a": 0.725, "b": 0.7})
    # of other LoRAs' queries only: the hub's 0.85 to a's own query still counts, a's 0.95 does not
    assert hubness(scores, ["hub", "b", "a"], k=2) == pytest.approx({"hub": 0.825, "a": 0.5})
    ix = _index({"hub": _unit([1, 0, 0]), "a": _unit([0, 1, 0]), "b": _unit([0, 0, 1])})
    # query 1: cosine prefers the hub by 0.4; CSLS (2 cos - r_e - r_q, r_q = 0.7) by 0.25
    f = features(ix, scores[:1], "csls", {"hubness": hub})
    assert f[0] == pytest.approx([1.8 - 0.875 - 0.7, (1.8 - 0.875) - (1.0 - 0.725)])
    assert features(ix, scores[:1], "cosine")[0] == pytest.approx([0.9, 0.4])
    # one entry: no margin; no entry (an empty index): no match
    assert features(ix, [[("a", 0.7)], []], "cosine") == pytest.approx(np.array([[0.7, 0.0], [-1e3, 0.0]]))


def test_spread_rescales_each_entry_by_its_own_images():
    ix = _index({"tight": _unit([1, 0]), "loose": _unit([0, 1])},
                {"tight": [0.95, 0.01], "loose": [0.70, 0.10]})
    # the same cosine is far below a tight LoRA's own images, and above a loose one's
    f = features(ix, [[("tight", 0.8), ("loose", 0.8)]], "spread")
    assert f[0] == pytest.approx([1.0, 16.0])
    # an entry without a record takes the index's median, and every sd is floored at half the median's
    ix.add("bare", _unit([1, 1]))
    f = features(ix, [[("bare", 0.8), ("tight", 0.8)]], "spread", {"self_sim_median": [0.6, 0.1]})
    assert f[0] == pytest.approx([2.0, 2.0 - (0.8 - 0.95) / 0.05])


def test_self_similarity_measures_each_image_against_the_entry_of_the_others():
    from lorafind_utils.rank.index_ops import self_similarity

    z = np.array([_unit([1, 0, 0]), _unit([1, 1, 0]), _unit([1, 0, 1]), _unit([1, 1, 1])], np.float32)
    mu, sd = self_similarity(z, "prototype")
    want = [float(z[i] @ _unit(z.sum(0) - z[i])) for i in range(4)]
    assert mu == pytest.approx(np.mean(want), abs=1e-5) and sd == pytest.approx(np.std(want), abs=1e-5)
    assert mu < float(np.mean(z @ _unit(z.sum(0))))  # below the in-sample similarity it would otherwise report
    assert self_similarity(z[:2], "prototype") is None  # too few images to say: the index's median is used


def test_the_best_score_on_validation_is_kept_and_used():
    rng = np.random.default_rng(0)
    names = [f"lora{i}" for i in range(6)]
    # loose LoRAs: their own images score ~0.6, tight ones ~0.95; a stranger scores ~0.75 against a
    # tight LoRA and ~0.3 against a loose one. Raw cosine ranks a tight LoRA's stranger above a loose
    # LoRA's own image; measured from each entry's own images (spread) they separate.
    stats = {n: ([0.6, 0.05] if i % 2 else [0.95, 0.01]) for i, n in enumerate(names)}
    ix = _index({n: _unit(np.eye(6)[i]) for i, n in enumerate(names)}, stats)
    full, y = [], []
    for n in names:
        for _ in range(20):
            own = stats[n][0] + rng.normal(0, stats[n][1])
            others = [(m, (0.3 if names.index(m) % 2 else 0.75) + rng.normal(0, 0.02)) for m in names if m != n]
            full.append(sorted([(n, own), *others], key=lambda t: -t[1]))
            y.append(n)
    rec = fit_calibration(ix, full, y)
    auroc = {k: c["auroc"] for k, c in rec["candidates"].items()}
    assert auroc["cosine"] < 0.9 < 0.95 < auroc["spread"]
    assert rec["score"] == max(auroc, key=auroc.get) and rec["validation"]["auroc"] == max(auroc.values())
    assert ix.params["calibration"] is rec
    p_known = match_probability(ix, full[:20])
    p_unknown = match_probability(ix, [[t for t in r if t[0] != "lora1"] for r in full[20:40]])
    assert np.mean(p_known > 0.5) > 0.9 and np.mean(p_unknown < 0.5) > 0.9
    assert match_probability(ix, full[:3], score="cosine").shape == (3,)
    with pytest.raises(ValueError, match="unknown 'none of these' score 'knn'"):
        match_probability(ix, full[:3], score="knn")


def test_an_index_calibrated_before_the_candidates_still_answers():
    ix = _index({"a": _unit([1, 0]), "b": _unit([0, 1])})
    assert match_probability(ix, [[("a", 0.9), ("b", 0.1)]]) == pytest.approx([0.5])  # never calibrated
    ix.params["calibration"] = {"score": "top-1 cosine and its margin over the 2nd", "coef": [10.0, 0.0],
                                "intercept": -5.0}
    assert match_probability(ix, [[("a", 0.9), ("b", 0.1)]]) == pytest.approx([1 / (1 + np.exp(-4.0))])
    with pytest.raises(ValueError, match="calibrated for the 'cosine' score only"):
        match_probability(ix, [[("a", 0.9), ("b", 0.1)]], score="csls")
