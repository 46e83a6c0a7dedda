"""Stage 08: the style index measured -- methods against the retrained classifier, LoRAs left out,
"none of these", preview-only entries, a stage-07 LoRA, and the costs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, stage_params
from lorafind_utils.rank.index_ops import (
    IndexRanker,
    StyleData,
    add_lora,
    build_index,
    calibrate,
    embed_style_data,
    finetune_params,
    index_lock,
    load_style_data,
    make_encoder,
    match_probability,
    queries_as,
    search_vectors,
    stored_centroid,
)
from lorafind_utils.rank.style_index import StyleIndex


def table3_queries(cfg: dict) -> tuple[list[dict], dict]:
    """Stage 05's queries (file, correct LoRA, how) and the classifier's metrics on them."""
    import json

    f = layout.rankings_file(cfg)
    if not f.exists():
        raise FileNotFoundError(
            f"{f} not found: run stage 05 (05_retrieve_thumbnails) first; stage 08 uses its queries"
        )
    r = json.loads(f.read_text())
    return r["queries"], r["metrics"]


def _ranks(index: StyleIndex, z: np.ndarray, truth: list[str]) -> list[int]:
    res = search_vectors(index, z)
    return [[n for n, _ in r].index(t) + 1 if t in [n for n, _ in r] else len(index) + 1 for r, t in zip(res, truth)]


def _summary(rows: list[dict], keys=("top1", "top3", "top6", "mrr")) -> dict:
    out = {}
    for k in keys:
        v = np.array([100 * r[k] for r in rows], float)
        out[f"{k}_mean"], out[f"{k}_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    out["runs"] = len(rows)
    return out


def _fmt(m: float, sd: float) -> str:
    return f"{m:.1f}" if sd != sd else f"{m:.1f} ± {sd:.1f}"


def run_stage(cfg: dict, p: dict, progress: bool = True, log=print) -> dict:
    """Stage 08: encoders × entry variants against the classifier on Table 3's queries; leave-LoRAs-out;
    the cost of adding a LoRA; "none of these" on styles no LoRA paints; thumbnail-only entries;
    query latency. Builds and saves the profile's index (under :func:`index_lock`, as :func:`build`).
    Returns every table (also written)."""
    with index_lock(layout.index_dir(cfg, p["encoder"], p["variant"]), "stage 08 (index)"):
        return _run_stage(cfg, p, progress, log)


def _run_stage(cfg: dict, p: dict, progress: bool, log) -> dict:
    from lorafind_utils.core.files import write_json_atomic

    catalog = load_catalog(cfg)
    k = len(catalog)
    sd = load_style_data(cfg)
    queries, clf_metrics = table3_queries(cfg)
    q_truth = [q["lora"] for q in queries]
    val_rows = [i for i, g in enumerate(sd.data.groups) if g in set(sd.val_ids)]
    val_y = [sd.classes[y] for y in sd.data.y[val_rows].tolist()]
    results: dict = {"queries": len(queries), "chance": {"top1": 1 / k, "mrr": float(np.mean(1 / np.arange(1, k + 1)))}}

    ctx = _Stage08(cfg, p, catalog, k, sd, queries, clf_metrics, q_truth, val_rows, val_y, results, progress)
    methods, (enc, index, zq), others = _compare_methods(ctx)
    folder = index.save(layout.index_dir(cfg, p["encoder"], p["variant"]))
    log(f"index saved: {folder} ({len(index)} LoRAs, {enc.kind} encoder, {p['variant']})")
    _leave_loras_out(ctx)
    panels = _open_set(ctx, {enc.kind: (enc, index, zq), **others})
    _thumbnail_entries(ctx, index, zq)
    _costs(ctx, enc, folder)
    _stage07_lora(ctx, enc, folder, log)
    write_json_atomic(results, layout.index_results(cfg, "stage08"))
    results["open_set_panels"] = panels
    results["methods_df"], results["index_folder"] = methods, folder
    return results


@dataclass
class _Stage08:
    """What stage 08's parts share: the profile, its parameters, the data and Table 3's queries."""
    cfg: dict
    p: dict
    catalog: list
    k: int
    sd: StyleData
    queries: list
    clf_metrics: dict
    q_truth: list
    val_rows: list
    val_y: list
    results: dict
    progress: bool


def _compare_methods(c: _Stage08):
    """1. every encoder (trained over seeds) x both entry variants, on Table 3's queries: (table, the default's
    (encoder, index, query embeddings), the same of every other encoder with the default's variant)."""
    import pandas as pd

    from lorafind_utils.core.files import write_csv_atomic, write_markdown_table
    from lorafind_utils.rank.classifier_ranker import retrieval_metrics

    cfg, p, catalog, k, sd = c.cfg, c.p, c.catalog, c.k, c.sd
    queries, q_truth, results = c.queries, c.q_truth, c.results
    method_rows, per_run, default, others = [], [], None, {}
    variants = ("prototype", "content_cancelled")
    for kind in p["compare"]:
        seeds = p["seeds"] if kind == "trained" else [None]
        runs = {v: [] for v in variants}
        for seed in seeds:
            enc = make_encoder(cfg, kind, sd, seed=seed or 0, progress=c.progress)
            zq, errs = enc.embed_files([q["file"] for q in queries])
            if any(e is not None for e in errs):
                raise ValueError(f"unreadable stage-05 queries: {[str(e) for e in errs if e is not None]}")
            emb = embed_style_data(enc, sd)  # once per encoder, for both variants
            z_val = emb.images[c.val_rows]
            for v in variants:
                index = build_index(enc, sd, v, catalog, embedded=emb)
                cal = calibrate(index, z_val, c.val_y)
                m = retrieval_metrics(_ranks(index, zq, q_truth), k)
                runs[v].append(m)
                per_run.append(
                    {"encoder": kind, "seed": seed, "variant": v, **m, "val_auroc": cal["validation"]["auroc"]}
                )
                if kind == p["encoder"] and v == p["variant"] and default is None:
                    default = (enc, index, zq)
                elif v == p["variant"] and kind != p["encoder"] and kind not in others:
                    others[kind] = (enc, index, zq)  # the other encoders' "none of these", for the open-set table
        for v in variants:
            method_rows.append({"method": f"index: {kind} encoder", "entry": v.replace("_", "-"), **_summary(runs[v])})
    method_rows.append({"method": "classifier (stage 02, retrained per catalog)", "entry": "",
                        **{f"{m}_mean": 100 * c.clf_metrics["all"][m] for m in ("top1", "top3", "top6", "mrr")},
                        **{f"{m}_sd": float("nan") for m in ("top1", "top3", "top6", "mrr")}, "runs": 1})
    methods = pd.DataFrame(method_rows)
    write_csv_atomic(methods, layout.figure(cfg, "index_methods.csv"))
    write_markdown_table(
        layout.figure(cfg, "index_methods.md"),
        ["method", "entry", "top-1", "top-3", "top-6", "MRR", "runs"],
        [
            [
                r["method"],
                r["entry"],
                *[_fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in ("top1", "top3", "top6", "mrr")],
                str(r["runs"]),
            ]
            for r in method_rows
        ],
        f"Percent on stage 05's {len(queries)} queries (Table 3's), mean ± sd over the trained encoder's "
        f"seeds {p['seeds']}; a random ranking: top-1 {100 / k:.1f} %, MRR {100 * results['chance']['mrr']:.1f} %.",
    )
    results["methods"] = method_rows
    results["runs"] = per_run
    if default is None:
        raise ValueError(f"08_index: encoder '{p['encoder']}' must be one of compare {p['compare']}")
    return methods, default, others


def _leave_loras_out(c: _Stage08):
    """2. leave-LoRAs-out: each fitted encoder of the comparison (trained, gramstats) never saw a third of the
    LoRAs; they enter as `index add` does."""
    from lorafind_utils.core.files import write_markdown_table
    from lorafind_utils.models.style_encoder import FITTED

    cfg, p, k, results = c.cfg, c.p, c.k, c.results
    if p["folds"] == 1:
        raise ValueError("08_index: folds must be 0 (skip) or at least 2 (each fold leaves 1/folds of the LoRAs out)")
    kinds = [kind for kind in dict.fromkeys([p["encoder"], *p["compare"]]) if kind in FITTED] if p["folds"] else []
    by_kind = {kind: [_fold(c, kind, f) for f in range(p["folds"])] for kind in kinds}
    results["folds"] = by_kind.get(p["encoder"], [])
    results["folds_by_encoder"] = by_kind
    if not by_kind:
        return
    n_new = len(next(iter(by_kind.values()))[0]["new"])

    def row(label, queries, key, folds):
        s = _summary([r[key] for r in folds])
        return [label, queries, *[_fmt(s[f"{m}_mean"], s[f"{m}_sd"]) for m in ("top1", "mrr")]]

    rows = []
    for kind, folds in by_kind.items():
        made = "trained" if kind == "trained" else "fitted"
        label = f"index ({kind} encoder, {made} on the other LoRAs); new ones added"
        rows += [row(label, "the added LoRAs' queries", "index_new", folds),
                 row(label, "all queries", "index_all", folds)]
    rows.append(row(f"classifier retrained on all {k} (upper bound)", "the added LoRAs' queries", "classifier12_new",
                    next(iter(by_kind.values()))))
    rows.append([f"classifier trained on {k - n_new} LoRAs", "the added LoRAs' queries", "0.0", "—"])
    write_markdown_table(
        layout.figure(cfg, "index_leave_out.md"),
        ["model", "queries", "top-1", "MRR"],
        rows,
        f"{p['folds']} folds; in each, {n_new} LoRAs are left out of the encoder's training (trained) or fit "
        f"(gramstats) and added from {p['add_images']} restyled base images each (as `lorafind index add` does). "
        "Percent, mean ± sd over folds. A classifier trained without them cannot name them.",
    )


def _fold(c: _Stage08, kind: str, f: int) -> dict:
    """One leave-LoRAs-out fold of one fitted encoder: metrics on the left-out LoRAs' queries and on all."""
    from lorafind_utils.rank.classifier_ranker import retrieval_metrics

    cfg, p, catalog, k, sd, queries, q_truth = c.cfg, c.p, c.catalog, c.k, c.sd, c.queries, c.q_truth
    new = sd.classes[f :: p["folds"]]
    old = [c for c in sd.classes if c not in new]
    run = p["run_name"] if kind == "trained" else f"{p['run_name']}_{kind}"
    enc_f = make_encoder(cfg, kind, sd, seed=p["seeds"][0], classes=old,
                         folder=layout.encoder_dir(cfg, f"{run}_fold{f}of{p['folds']}"), progress=c.progress)
    emb_f = embed_style_data(enc_f, sd)
    idx = build_index(enc_f, sd, p["variant"], catalog, classes=old, embedded=emb_f)
    added = build_index(enc_f, sd, p["variant"], catalog, ids=sd.train_ids[: p["add_images"]], classes=new,
                        embedded=emb_f)
    for n in added.names():
        e = added.entry(n)
        idx.add(n, e.vector, e.meta)
    zf, _ = enc_f.embed_files([q["file"] for q in queries])
    ranks = _ranks(idx, zf, q_truth)
    is_new = [t in new for t in q_truth]
    clf = [q["rank_of_correct"] for q in queries]
    return {"fold": f, "new": new, "index_new": retrieval_metrics([r for r, n in zip(ranks, is_new) if n], k),
            "index_all": retrieval_metrics(ranks, k),
            "classifier12_new": retrieval_metrics([r for r, n in zip(clf, is_new) if n], k)}


def _open_set(c: _Stage08, encoders: dict):
    """3. "none of these": queries in styles no LoRA paints vs the catalogued ones (Table 3's queries), for
    each encoder's index (``encoders``: kind -> (encoder, calibrated index, Table 3's query embeddings), the
    profile's first) under every calibrated score. The uncatalogued styles are applied to each of the
    ``open_set_sets`` (the first is the headline: the style samples' own photos, so only the style differs).
    Returns the figure's panels: {title: (catalogued P(match), uncatalogued P(match))} of the fitted encoders'
    indexes under their kept score, on the first set."""
    from sklearn.metrics import roc_auc_score

    from lorafind_utils.core.files import write_markdown_table
    from lorafind_utils.core.images import load_rgb, read_base_set, square_resize
    from lorafind_utils.core.styles import apply_style
    from lorafind_utils.models.style_encoder import FITTED
    from lorafind_utils.rank.open_set import SCORES

    cfg, p, results = c.cfg, c.p, c.results
    size = int(stage_params(cfg, "01_synthesize")["resolution"])
    unknown = {}
    for set_name in p["open_set_sets"]:
        photos = read_base_set(layout.base_set_dir(cfg, set_name))[: p["open_set_images"]]
        imgs = [apply_style(style, square_resize(load_rgb(b.path), size)) for style in p["open_set_styles"]
                for b in photos]
        if imgs:
            unknown[set_name] = imgs
    results["open_set"] = {}
    if not unknown:
        return {}
    rows, by_encoder, headline, panels = [], {}, None, {}
    for kind, (enc, index, zq) in encoders.items():
        cal = index.params["calibration"]
        known_scores = search_vectors(index, zq)
        by_score = {s: {"validation": cal["candidates"][s]["auroc"]} for s in SCORES}
        for set_name, imgs in unknown.items():
            unknown_scores = search_vectors(index, enc.embed_images(imgs))
            t = np.concatenate([np.ones(len(known_scores)), np.zeros(len(unknown_scores))])
            for s in SCORES:
                kp, up = match_probability(index, known_scores, s), match_probability(index, unknown_scores, s)
                by_score[s][set_name] = float(roc_auc_score(t, np.concatenate([kp, up])))
                if s == cal["score"] and set_name == next(iter(unknown)):
                    if headline is None:
                        headline = (kind, s, set_name, kp, up, cal)
                    if kind in FITTED or kind == p["encoder"]:
                        auc = by_score[s][set_name]
                        star = " (the profile's index)" if kind == p["encoder"] else ""
                        panels[f"{kind} encoder{star}, {s}: AUROC {auc:.3f}"] = (kp, up)
        by_encoder[kind] = by_score
        for s in SCORES:
            rows.append([f"{kind}" + (" (the profile's index)" if kind == p["encoder"] else ""),
                         s + (" (kept: best on validation)" if s == cal["score"] else ""),
                         f"{by_score[s]['validation']:.3f}", *[f"{by_score[s][n]:.3f}" for n in unknown]])
    kind, score, set_name, known_p, unknown_p, cal = headline
    open_set = {
        "encoder": kind,
        "score": score,
        "auroc": by_encoder[kind][score][set_name],
        "photos": set_name,
        "none_rate_known": float(np.mean(known_p < 0.5)),
        "none_rate_unknown": float(np.mean(unknown_p < 0.5)),
        "known": len(known_p),
        "unknown": len(unknown_p),
        "styles": p["open_set_styles"],
        "validation_auroc": cal["validation"]["auroc"],
        "by_encoder": by_encoder,
    }
    styles = ", ".join(p["open_set_styles"])
    write_markdown_table(
        layout.figure(cfg, "index_open_set.md"),
        ["index encoder", "'none of these' score", "validation AUROC (out of fold)",
         *[f"AUROC: {styles} on {n} photos ({len(v)})" for n, v in unknown.items()]],
        rows,
        f"Catalogued: Table 3's {len(known_p)} queries. Validation: stage-01 images of the validation base images "
        f"against each index with and without their LoRA; each index keeps its best score there. The profile's "
        f"index ({kind} encoder, {score}, P(match) < 0.5) says 'none of these' for "
        f"{100 * open_set['none_rate_known']:.1f} % of catalogued queries and "
        f"{100 * open_set['none_rate_unknown']:.1f} % of uncatalogued ones on {set_name} photos. "
        f"Entries: {p['variant']}.",
    )
    results["open_set"] = open_set
    return panels


def _thumbnail_entries(c: _Stage08, index: StyleIndex, zq: np.ndarray):
    """4. thumbnail-only entries (a LoRA known by its previews) vs synthesized ones, leave-one-query-out."""
    from lorafind_utils.rank.classifier_ranker import retrieval_metrics

    k, sd, q_truth, results = c.k, c.sd, c.q_truth, c.results
    by_lora: dict[str, list[int]] = {}
    for i, t in enumerate(q_truth):
        by_lora.setdefault(t, []).append(i)
    proto = np.stack([index.entry(c).vector for c in sd.classes])
    zq_e = queries_as(zq, index.variant, stored_centroid(index))
    thumb_ranks, synth_ranks = [], []
    for i, t in enumerate(q_truth):
        ents = []
        for c in sd.classes:
            rows = [j for j in by_lora.get(c, []) if j != i]
            v = zq_e[rows].mean(0) if rows else np.zeros(zq_e.shape[1])
            ents.append(v / (np.linalg.norm(v) + 1e-12))
        s = np.stack(ents) @ zq_e[i]
        thumb_ranks.append(int((s > s[sd.classes.index(t)]).sum()) + 1)
        s2 = proto @ zq_e[i]
        synth_ranks.append(int((s2 > s2[sd.classes.index(t)]).sum()) + 1)
    results["thumbnails_vs_synth"] = {
        "thumbnails": retrieval_metrics(thumb_ranks, k),
        "synthesized": retrieval_metrics(synth_ranks, k),
        "thumbnails_per_lora": float(np.mean([len(v) for v in by_lora.values()])) - 1,
    }


def _costs(c: _Stage08, enc, folder: Path):
    """5. the cost of adding a LoRA vs retraining the classifier; query latency."""
    from lorafind_utils.core.files import write_markdown_table

    cfg, p, catalog, queries, results = c.cfg, c.p, c.catalog, c.queries, c.results
    import shutil
    import tempfile

    from lorafind_utils.models.pipelines import cached_pipeline

    cached_pipeline(cfg, stage_params(cfg, "01_synthesize")["dtype"])  # loaded once, as in a long-lived process
    with tempfile.TemporaryDirectory(prefix="lorafind-add-") as tmp:
        scratch = Path(tmp) / folder.name  # a copy: the measured add must not change the profile's index
        shutil.copytree(folder, scratch)
        r = IndexRanker(cfg, enc, scratch)
        e = catalog[0]
        add = add_lora(cfg, e["path"], name=f"{e['slug']}_copy", ranker=r, progress=False, log=lambda *a: None)
    m02 = layout.metrics_file(layout.train_dir(cfg, finetune_params(cfg)["run_name"]))
    import json

    retrain = json.loads(m02.read_text())["finetuned"]["train_seconds"] if m02.exists() else float("nan")
    results["add"] = {
        **add,
        "classifier_retrain_seconds": retrain,
        "ratio": add["seconds"] / retrain if retrain == retrain else None,
    }
    ranker = IndexRanker(cfg, enc, folder)
    results["latency_ms"] = _query_latency(ranker, queries, p["latency_queries"])
    big = _padded_latency(c, enc, folder) if p["latency_entries"] > len(catalog) else []
    results["latency_padded"] = big
    tv = results["thumbnails_vs_synth"]
    cost_rows = [
        [
            "add one LoRA (restyle + embed + add + save)",
            f"{add['seconds']:.1f} s ({add['images']} images; restyling {add['restyle_seconds']:.1f} s)",
        ],
        ["retrain the classifier (stage 02's training time)", f"{retrain:.1f} s"],
        ["ratio", f"{results['add']['ratio']:.3f}" if results["add"]["ratio"] is not None else "—"],
        [
            "one query, file → ranking (model loaded)",
            f"p50 {results['latency_ms']['p50']:.1f} ms, p90 {results['latency_ms']['p90']:.1f} ms",
        ],
        *[
            [
                f"one query, file → top-10 ranking and P(match), {b['entries']:,} entries ({b['kind']})",
                f"p50 {b['p50']:.1f} ms, p90 {b['p90']:.1f} ms (built in {b['build_s']:.1f} s)",
            ]
            for b in big
        ],
        [
            "entries from the LoRAs' own previews (leave-one-out)",
            f"top-1 {100 * tv['thumbnails']['top1']:.1f} %, MRR {100 * tv['thumbnails']['mrr']:.1f} %",
        ],
        [
            "entries from restyled base images",
            f"top-1 {100 * tv['synthesized']['top1']:.1f} %, MRR {100 * tv['synthesized']['mrr']:.1f} %",
        ],
    ]
    write_markdown_table(layout.figure(cfg, "index_costs.md"), ["measure", "value"], cost_rows,
                         f"Index: {enc.kind} encoder, {p['variant']} entries; CPU ({cfg['name']} profile).")


def _query_latency(ranker: IndexRanker, queries: list, n: int) -> dict:
    """p50 / p90 (ms) of ``n`` single queries, file -> ranking, after one warm-up (which reads the index)."""
    ranker.rank_files([queries[0]["file"]])
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        ranker.rank_files([queries[i % len(queries)]["file"]])
        lat.append(1000 * (time.perf_counter() - t0))
    return {"p50": float(np.median(lat)), "p90": float(np.percentile(lat, 90)), "n": len(lat)}


def _padded_latency(c: _Stage08, enc, folder: Path) -> list[dict]:
    """One query file -> its top-10 ranking and P(match), end to end, with the index padded to
    ``latency_entries`` by synthetic entries (each a real entry's vector plus noise), as the profile's
    ``auto`` kind builds it and as HNSW. A scratch copy: the profile's index is not changed."""
    import shutil
    import tempfile

    p, queries = c.p, c.queries
    out = []
    with tempfile.TemporaryDirectory(prefix="lorafind-latency-") as tmp:
        index = StyleIndex.load(folder)
        real = index.vectors()
        n = int(p["latency_entries"]) - len(index)
        rng = np.random.default_rng(0)
        pad = real[rng.integers(0, len(real), n)] + rng.normal(0, 0.5 / np.sqrt(index.dim), (n, index.dim))
        index.add_many([f"synthetic_{i:07d}" for i in range(n)], pad.astype(np.float32))
        for kind in ("auto", "hnsw"):
            if out and out[0]["kind"] == kind:
                continue  # auto chose HNSW already
            scratch = Path(tmp) / kind
            shutil.copytree(folder, scratch)
            index.kind = kind
            t0 = time.perf_counter()
            index.save(scratch)
            build_s = time.perf_counter() - t0
            ranker = IndexRanker(c.cfg, enc, scratch, top_k=10)
            lat = _query_latency(ranker, queries, p["latency_queries"])  # first: its warm-up builds the index
            out.append({"entries": len(index), "kind": ranker.index.built_kind or kind, "build_s": build_s, **lat})
            shutil.rmtree(scratch)
    return out


def _stage07_lora(c: _Stage08, enc, folder: Path, log=print) -> None:
    """6. Stage 07's trained LoRAs join a copy of the index as ``lorafind index add`` adds them (their kohya
    files); each is then ranked for stage 07's held-out style images (never trained on). Skipped, and
    said so, when stage 07 has not run."""
    import shutil
    import tempfile

    from lorafind_utils.core.files import write_markdown_table
    from lorafind_utils.models.lora_training import read_style_set, split_style_set

    cfg, results = c.cfg, c.results
    p07 = stage_params(cfg, "07_train_style_lora")
    run_dir = layout.style_lora_dir(cfg, p07["run_name"])
    files = {r: layout.lora_kohya_file(layout.style_rank_dir(run_dir, r)) for r in p07["ranks"]}
    if not layout.sweep_file(run_dir).exists() or not all(f.exists() for f in files.values()):
        results["style_lora"] = {"skipped": f"stage 07 has not run ({run_dir})"}
        log(f"stage 07's LoRAs: not in {run_dir}; run stage 07 first to add them to the index")
        return
    from lorafind_utils.core.config import resolve

    style_dir = resolve(p07["style_dir"]) if p07["style_dir"] else layout.style_set_dir(run_dir)
    items = read_style_set(style_dir, p07["caption_template"], p07["style_name"], int(p07["resolution"]))
    _, heldout = split_style_set(items, float(p07["holdout"]), int(p07["seed"]))
    rows, out = [], {}
    with tempfile.TemporaryDirectory(prefix="lorafind-style-lora-") as tmp:
        for r, f in files.items():
            scratch = Path(tmp) / f"r{r}"  # each rank alone: the profile's index stays as stage 08 saved it
            shutil.copytree(folder, scratch)
            ranker = IndexRanker(cfg, enc, scratch)
            name = f"{p07['run_name']}_r{r}"
            add_lora(cfg, f, name=name, ranker=ranker, progress=False, log=lambda *a: None)
            ranked = ranker.rank_images([it.image for it in heldout], [it.file for it in heldout])
            ranks = [q.rank_of(name) for q in ranked]
            out[str(r)] = {"name": name, "ranks": ranks, "top1": float(np.mean([x == 1 for x in ranks])),
                           "mrr": float(np.mean([1 / x for x in ranks])), "entries": len(ranker.index)}
            rows.append([f"rank {r}", str(len(ranks)), f"{100 * out[str(r)]['top1']:.1f} %",
                         f"{100 * out[str(r)]['mrr']:.1f} %", " ".join(map(str, ranks))])
    results["style_lora"] = {"style": p07["style_name"], "heldout": len(heldout), "per_rank": out}
    write_markdown_table(
        layout.figure(cfg, "index_style_lora.md"),
        ["stage-07 LoRA", "held-out style images", "found first", "MRR", "rank of the LoRA per image"],
        rows,
        f"Each of stage 07's LoRAs ('{p07['style_name']}') added to the index from its kohya file as "
        f"`lorafind index add` does ({c.p['add_images']} restyled base images), then ranked among "
        f"{len(c.catalog) + 1} entries for stage 07's held-out style images.",
    )
