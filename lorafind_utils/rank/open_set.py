"""'None of these': P(the catalog has a query's LoRA), from the query's ranking.

A raw cosine is not calibrated across styles: some entries sit close to every query (hubs), some
LoRAs paint loosely so even their own images score low against them. Three scores are fitted,
each into P(match) by a logistic regression on two numbers (the best score and its margin over
the second), and the one with the best validation AUROC is the index's:

* ``cosine``: the top-1 inner product as searched;
* ``csls``: cross-domain similarity local scaling, ``2 cos - r_e - r_q``, with ``r_e`` the mean
  similarity of entry ``e`` to its ``k`` nearest validation queries of other LoRAs (a hub is
  discounted) and ``r_q`` the query's mean similarity to its candidates;
* ``spread``: ``(cos - mu_e) / sd_e``, with ``mu_e, sd_e`` the similarity of entry ``e``'s own
  images, each measured as a query, to the entry made from the others (recorded when the entry is
  made; entries of fewer than 3 images, or older ones, take the index's median).

Validation: stage-01 images of the validation base images, scored once against the full index
(their LoRA is in it) and once against the index without their LoRA (leave-one-LoRA-out: a style
the catalog does not have). Scores are compared by out-of-fold AUROC. The threshold is P = 0.5.
"""
from __future__ import annotations

import numpy as np

SCORES = ("cosine", "csls", "spread")
#: validation queries per entry whose mean similarity is the entry's hubness (CSLS's k)
CSLS_K = 10
#: entries (the best by cosine) each score rescales: P(match) needs a ranking this long, whatever is shown
CANDIDATES = 10

Ranked = list[list[tuple[str, float]]]


def median_stats(index) -> list[float]:
    """The median (mean, sd) self-similarity of the index's entries that record one."""
    known = np.array([v for n in index.names() if (v := index.entry(n).meta.get("self_sim"))], float).reshape(-1, 2)
    return np.median(known, 0).round(6).tolist() if len(known) else [0.0, 1.0]


def entry_stats(index, names: list[str], median: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Each named entry's (mean, sd) self-similarity; the index's ``median`` where an entry has none. An
    sd is floored at half the median's, so an entry of very alike images does not blow its scale up."""
    fallback = median or [0.0, 1.0]
    st = np.array([index.entry(n).meta.get("self_sim") or fallback for n in names], float).reshape(-1, 2)
    return st[:, 0], np.maximum(st[:, 1], 0.5 * float(median[1]) if median else 1e-3)


def hubness(scores: Ranked, truth: list[str] | None = None, k: int = CSLS_K) -> dict[str, float]:
    """Each entry's mean similarity to its ``k`` nearest queries among ``scores`` (full rankings) --
    of other LoRAs' queries when ``truth`` names each query's LoRA (how close it sits to strangers)."""
    per: dict[str, list[float]] = {}
    for j, r in enumerate(scores):
        for n, s in r:
            if truth is None or n != truth[j]:
                per.setdefault(n, []).append(s)
    return {n: float(np.mean(sorted(v, reverse=True)[:k])) for n, v in per.items()}


def features(index, scores: Ranked, score: str, cal: dict | None = None) -> np.ndarray:
    """[best score, its margin over the second] per query, under ``score`` (one of :data:`SCORES`), over
    each ranking's first :data:`CANDIDATES` entries (rankings are by cosine, best first). CSLS is
    ``2 cos - r_e - r_q``, ``r_q`` the mean of the query's own candidates' cosines. A ranking of one
    entry has margin 0; an empty one (an empty index) scores as no match."""
    if score not in SCORES:
        raise ValueError(f"unknown 'none of these' score '{score}' (one of {', '.join(SCORES)})")
    out = np.zeros((len(scores), 2))
    cal = cal or {}
    hub = cal.get("hubness") or {}
    median = cal.get("self_sim_median")
    hub_default = float(np.median(list(hub.values()))) if hub else 0.0
    for i, r in enumerate(scores):
        r = r[:CANDIDATES]
        if not r:
            out[i] = (-1e3, 0.0)
            continue
        names = [n for n, _ in r]
        s = np.array([v for _, v in r], float)
        if score == "csls":
            s = 2 * s - np.array([hub.get(n, hub_default) for n in names]) - s.mean()
        elif score == "spread":
            mu, sd = entry_stats(index, names, median)
            s = (s - mu) / sd
        s = np.sort(s)[::-1]
        out[i] = (s[0], s[0] - s[1] if len(s) > 1 else 0.0)
    return out


def _grouped_auroc(x: np.ndarray, t: np.ndarray, groups: np.ndarray) -> float:
    """AUROC of a logistic regression's out-of-fold scores (folds keep an image's known and unknown
    rows together), so the score choice is not fitted to the rows it is judged on."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        return float("nan")
    cv = GroupKFold(n_splits=min(5, n_groups))
    z = cross_val_predict(LogisticRegression(class_weight="balanced"), x, t, groups=groups, cv=cv,
                          method="decision_function")
    return float(roc_auc_score(t, z))


def fit_calibration(index, full: Ranked, y_val: list[str]) -> dict:
    """Fit every score on validation rankings ``full`` (each query's LoRA is ``y_val``), keep the best by
    cross-validated validation AUROC and store it (with the others') in ``index.params["calibration"]``."""
    from sklearn.linear_model import LogisticRegression

    held = [[(n, s) for n, s in r if n != y] for r, y in zip(full, y_val)]
    hub, median = hubness(full, y_val), median_stats(index)
    t = np.concatenate([np.ones(len(full)), np.zeros(len(held))])
    groups = np.tile(np.arange(len(full)), 2)
    candidates = {}
    for score in SCORES:
        part = {"hubness": hub, "self_sim_median": median}
        x = np.concatenate([features(index, full, score, part), features(index, held, score, part)])
        lr = LogisticRegression(class_weight="balanced").fit(x, t)
        candidates[score] = {"coef": lr.coef_[0].round(6).tolist(), "intercept": round(float(lr.intercept_[0]), 6),
                             "auroc": round(_grouped_auroc(x, t, groups), 4)}
    aurocs = {s: candidates[s]["auroc"] for s in SCORES}
    best = max(SCORES, key=lambda s: -1.0 if aurocs[s] != aurocs[s] else aurocs[s])  # ties: the first
    rec = {"score": best, **{k: candidates[best][k] for k in ("coef", "intercept")}, "threshold_p": 0.5,
           "features": "best score and its margin over the 2nd", "candidates": candidates,
           "hubness": {n: round(v, 6) for n, v in hub.items()}, "self_sim_median": median,
           "validation": {"queries": len(full), "auroc": candidates[best]["auroc"],
                          "how": "stage-01 images of the validation base images; unknown = the same image with its "
                                 "own LoRA left out of the index; AUROC out of fold (5 folds by image)"}}
    index.params["calibration"] = rec
    return rec


def match_probability(index, scores: Ranked, score: str | None = None) -> np.ndarray:
    """P(the catalog has the query's LoRA) per query, under the calibrated score (or ``score``, one of
    the fitted candidates); 0.5 when the index was never calibrated."""
    cal = index.params.get("calibration")
    if not cal or not scores:
        return np.full(len(scores), 0.5)
    if score is not None and score not in SCORES:
        raise ValueError(f"unknown 'none of these' score '{score}' (one of {', '.join(SCORES)})")
    fit = cal  # the kept score's fit is the record's own coef and intercept
    kept = cal.get("score") if cal.get("score") in SCORES else "cosine"  # older indexes: top-1 cosine
    if score is None:
        score = kept
    elif score in cal.get("candidates", {}):
        fit = cal["candidates"][score]
    elif score != kept:
        raise ValueError(f"this index was calibrated for the '{kept}' score only; rebuild it "
                         f"(`lorafind index build`) to compare '{score}'")
    z = features(index, scores, score, cal) @ np.asarray(fit["coef"]) + fit["intercept"]
    return 1 / (1 + np.exp(-z))
