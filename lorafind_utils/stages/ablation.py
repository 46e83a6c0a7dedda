"""Stages 03-04: training-size ablation and domain vs variety, and the complete Table 2.

Every setting is one call of stage 02's :func:`~lorafind_utils.stages.fine_tuning.run_finetune` (same
training and evaluation code), repeated over seeds, all validated on the one validation set
that stage 02's split defines (``val_set``, ``val_fraction``, ``split_seed``). Each run writes
its own folder ``runs/<profile>/train/<run_name>/`` (``metrics.json``, ``history.csv``,
``split.json``); a finished run with identical parameters is reused, so stage 04 takes the
70-variety runs that stage 03 made, and an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from lorafind_utils.core import layout
from lorafind_utils.core.config import stage_params
from lorafind_utils.core.files import write_csv_atomic, write_markdown_table
from lorafind_utils.core.metrics import RUN_METRICS
from lorafind_utils.stages.fine_tuning import BACKBONE_LABELS, PAPER_TABLE2, run_finetune

METRICS = RUN_METRICS


def run_name(train_set: str, n: int, seed: int) -> str:
    return f"ablate_{train_set}_n{n}_s{seed}"


def synth_signature(cfg: dict) -> str:
    """A short hash of stage 01's manifest: the images a run learned from. A rerun of stage 01
    (or another catalog) changes it, and finished runs are then trained again."""
    import hashlib

    manifest = layout.synth_manifest(layout.synth_dir(cfg))
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.exists() else ""


def setting_params(cfg: dict, train_set: str, n: int, seed: int, epochs: int | None, patience: int | None,
                   threads: int | None, synth_sig: str) -> tuple[dict, dict]:
    """Stage 02's parameters for one ablation run (same validation set, no probe), and the facts
    beside them that identify the run.

    ``threads`` (torch threads on CPU) identifies the run: CPU training sums in a different order
    with another thread count, so the numbers agree only to float precision. ``synth_sig``:
    :func:`synth_signature`.
    :return: (stage-02 parameters, {"threads", "synth_manifest"}).
    """
    p = stage_params(cfg, "02_finetune")
    p.update(
        train_set=train_set, n_train=int(n), seed=int(seed), run_name=run_name(train_set, n, seed), linear_probe=False
    )
    if epochs is not None:  # None: stage 02's
        p["epochs"] = int(epochs)
    if patience is not None:
        p["patience"] = int(patience)
    return p, {"threads": threads, "synth_manifest": synth_sig}


def _finished(out_dir: Path, p: dict, record: dict) -> dict | None:
    f = layout.metrics_file(out_dir)
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError:  # half-written by a killed run: train again
        return None
    same = m.get("params") == json.loads(json.dumps(p)) and m.get("run") == json.loads(json.dumps(record))
    return m if same else None


def _train_setting(job: tuple) -> dict:
    """One ablation run (a worker's job): stage 02's training and evaluation."""
    cfg, p, record, out = job  # run_jobs gives it record["threads"] torch threads
    return run_finetune(cfg, p, out_dir=out, progress=False, save_model=False, record=record)["metrics"]


def run_settings(
    cfg: dict,
    settings: list[tuple[str, int]],
    seeds: list[int],
    epochs: int | None = None,
    patience: int | None = None,
    reuse: bool = True,
    progress: bool = True,
    workers="auto",
    threads: int | None = 1,
):
    """Train and evaluate every (train set, images per class) x seed; one row per run.

    :param epochs: ``patience``: per run (None: stage 02's, like every other training setting).
    :param reuse: take a finished run with identical parameters from disk instead of training.
    :param workers: runs trained at once on CPU (``auto``: cores / threads); 1 on a GPU.
    :param threads: torch threads per run on CPU (recorded; None on CPU = this process's count).
    :return: pandas DataFrame with train_set, n, seed, the fine-tuned metrics, the untrained-head
        baseline's metrics (``pretrained_*``), best epoch, seconds, reused flag and run folder.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from lorafind_utils.engines.local import job_threads, resolve_workers, run_jobs
    from lorafind_utils.models.pipelines import profile_device

    device = profile_device(cfg)
    threads = job_threads(device, threads)
    jobs = [(s, int(n), int(seed)) for s, n in settings for seed in seeds]
    sig = synth_signature(cfg)
    runs = [setting_params(cfg, s, n, seed, epochs, patience, threads, sig) for s, n, seed in jobs]
    found = [_finished(layout.train_dir(cfg, p["run_name"]), p, rec) if reuse else None for p, rec in runs]
    todo = [i for i, m in enumerate(found) if m is None]
    workers = resolve_workers(workers, device, len(todo), threads)

    bar = tqdm(total=len(jobs), desc=f"ablation runs ({workers} at once)" if workers > 1 else "ablation runs",
               unit="run", disable=not progress)
    bar.update(len(jobs) - len(todo))

    def done(k, _):
        s, n, seed = jobs[todo[k]]
        bar.set_postfix(last=f"{s} n={n} seed={seed}")
        bar.update(1)

    # longest first (most images), so that the workers finish together
    order = sorted(range(len(todo)), key=lambda k: -jobs[todo[k]][1])
    trained = run_jobs(_train_setting, [(cfg, *runs[i], layout.train_dir(cfg, runs[i][0]["run_name"])) for i in todo],
                       workers=workers, threads=threads, on_done=done, order=order)
    bar.close()
    for i, m in zip(todo, trained):
        found[i] = m
    rows = []
    trained_here = set(todo)
    for i, ((train_set, n, seed), (p, rec), m) in enumerate(zip(jobs, runs, found)):
        out = layout.train_dir(cfg, p["run_name"])
        split = json.loads(layout.split_file(out).read_text())
        row = {"train_set": train_set, "n": n, "seed": seed, "val_set": p["val_set"], "epochs": int(p["epochs"]),
               "backbone": m["backbone_name"], "n_train_images": m["n_train"], "n_val_images": m["n_val"]}
        row.update({k: m["finetuned"][k] for k in METRICS})
        row.update({f"pretrained_{k}": m["pretrained"][k] for k in METRICS})
        row.update(best_epoch=m["finetuned"]["best_epoch"], epochs_run=m["finetuned"]["epochs_run"],
                   train_seconds=m["finetuned"]["train_seconds"], threads=rec["threads"], reused=i not in trained_here,
                   val_ids="|".join(split["val_ids"]), run_dir=str(out))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(df):
    """Mean and sd (ddof=1) per (train_set, n) over seeds, in percent."""
    cols = list(METRICS) + [f"pretrained_{k}" for k in METRICS]
    g = df.groupby(["train_set", "n"], sort=False)[cols]
    out = (100 * g.mean()).add_suffix("_mean").join((100 * g.std(ddof=1)).add_suffix("_sd"))
    out["runs"] = g.size()
    return out.reset_index()


def _paper_cell(v) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def _fmt(mean: float, sd: float) -> str:
    if mean != mean:
        return ""
    return f"{mean:.2f}" if sd != sd else f"{mean:.2f} ± {sd:.2f}"


def table2(sizes, domain, baseline_metrics: dict | None = None, val_desc: str = ""):
    """The paper's Table 2 from per-run results: our mean ± sd, the paper's values apart.

    :param sizes: stage 03's per-run DataFrame; ``domain``: stage 04's (faces and variety rows).
    :param baseline_metrics: stage 02's metrics.json (for the linear-probe row), optional.
    :return: DataFrame with numeric ``*_mean``/``*_sd`` columns, ``paper_*`` columns and ``runs``.
    """
    import pandas as pd

    # stage 04's rows are the freshest: they win over an older sizes.csv for the same setting
    allruns = pd.concat([domain, sizes]).drop_duplicates(subset=["train_set", "n", "seed"])
    val_ids = set(allruns["val_ids"])
    if len(val_ids) != 1:
        raise ValueError("the runs were validated on different sets; Table 2 needs one validation set")
    if "epochs" in allruns and allruns["epochs"].nunique() > 1:
        raise ValueError(f"the runs were trained for different numbers of epochs ({sorted(set(allruns['epochs']))}); "
                         "rerun stages 03 and 04 with the same settings")
    net = BACKBONE_LABELS.get(allruns["backbone"].iloc[0], allruns["backbone"].iloc[0])
    n_val_base = len(next(iter(val_ids)).split("|"))
    val_desc = val_desc or f"{n_val_base} {allruns['val_set'].iloc[0]} images"
    rows = []

    def add(label, train_desc, runs, prefix, key):
        r = {"model": label, "train data": train_desc, "validation data": val_desc}
        for m in METRICS:
            vals = 100 * runs[f"{prefix}{m}"].astype(float)
            r[f"{m}_mean"] = float(vals.mean())
            r[f"{m}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        r["seeds"] = len(runs)
        paper = PAPER_TABLE2.get(key, {})
        for m in ("accuracy", "macro_f1", "mrr"):
            r[f"paper_{m}"] = paper.get(m, float("nan"))
        r["runs"] = " ".join(Path(d).name for d in runs["run_dir"])
        rows.append(r)

    order = [("variety", 100), (None, None), ("variety", 70), ("variety", 50), ("variety", 30), ("faces", 70)]
    present = {(s, int(n)) for s, n in zip(allruns["train_set"], allruns["n"])}
    for s, n in order + sorted(present - set(order)):
        if s is None:  # the paper's baseline: frozen backbone, untrained head (from the largest variety runs)
            biggest = allruns[allruns["train_set"] == "variety"]
            if len(biggest):
                biggest = biggest[biggest["n"] == biggest["n"].max()]
                add(f"Pretrained {net} (head untrained)", "", biggest, "pretrained_", (None, None))
            continue
        if (s, n) in present:
            runs = allruns[(allruns["train_set"] == s) & (allruns["n"] == n)]
            add(f"Fine-tuned {net}", f"{n} {'human face' if s == 'faces' else s} images", runs, "", (s, n))
    if baseline_metrics and "linear_probe" in baseline_metrics:
        lp = baseline_metrics["linear_probe"]
        r = {"model": f"Linear probe (frozen {net})",
             "train data": f"{baseline_metrics['train_base_images']} {baseline_metrics['params']['train_set']} images",
             "validation data": val_desc}
        for m in METRICS:
            r[f"{m}_mean"], r[f"{m}_sd"] = 100 * lp[m], float("nan")
        r.update(seeds=1, paper_accuracy=float("nan"), paper_macro_f1=float("nan"), paper_mrr=float("nan"),
                 runs=baseline_metrics["params"]["run_name"])
        rows.append(r)
    return pd.DataFrame(rows)


def write_table2(df, stem: str | Path, title: str = "") -> dict:
    """``<stem>.csv`` (numbers), ``<stem>.md`` and ``<stem>.png`` (mean ± sd; paper values apart)."""
    from lorafind_utils.core.figures import table_png

    stem = Path(stem)
    write_csv_atomic(df, stem.with_suffix(".csv"))
    show = ["model", "train data", "validation data"]
    head = show + ["Accuracy", "Macro-F1", "MRR", "Top-3", "seeds", "paper: Accuracy", "paper: Macro-F1", "paper: MRR"]
    cells = []
    for r in df.to_dict("records"):
        ours = [_fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in METRICS]
        paper = [_paper_cell(r[f"paper_{m}"]) for m in ("accuracy", "macro_f1", "mrr")]
        cells.append([str(r[c]) for c in show] + ours + [str(r["seeds"])] + paper)
    write_markdown_table(
        stem.with_suffix(".md"),
        head,
        cells,
        "Ours: percent, mean ± sd over seeds on one validation set. Paper: its Table 2 (single runs), "
        "shown apart and never mixed in; — = not reported (its baseline's Macro-F1 is NaN, from "
        "0/0 precision of never-predicted classes, which we count as 0). Runs: the `runs` column of the CSV "
        "names each run's folder under "
        "`runs/<profile>/train/`.",
    )
    table_png(
        cells,
        head,
        stem.with_suffix(".png"),
        title or "Table 2 (ours: mean ± sd over seeds; paper: its single runs, orange columns)",
        highlight_cols={j: "#e8e8e8" if j < 8 else "#fbe9d0" for j in range(len(head))},
    )
    return {
        "csv": str(stem.with_suffix(".csv")),
        "md": str(stem.with_suffix(".md")),
        "png": str(stem.with_suffix(".png")),
    }
