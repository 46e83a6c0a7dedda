"""Stage 02 glue: data from stage 01 -> fine-tuned classifier + both baselines -> artifacts.

Writes under ``<runs_dir>/train/<run_name>/``: ``model.safetensors`` + ``labels.json``,
``history.csv``, ``split.json`` and ``metrics.json`` (fine-tuned model, the paper's
"Pretrained ResNet50" baseline and a linear probe, all on the same validation set).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog
from lorafind_utils.core.files import run_lock, staged_dir, write_csv_atomic, write_json_atomic, write_markdown_table
from lorafind_utils.core.metrics import classification_metrics
from lorafind_utils.models.classifier import (
    build_model,
    cached_set,
    calibrate_batchnorm,
    describe_backbone,
    group_split,
    predict,
    rows_for,
    save_checkpoint,
    set_trainable,
    train,
    write_history,
)
from lorafind_utils.models.pipelines import profile_device


def make_split(cfg: dict, p: dict) -> dict:
    """Train/validation split by base image of the validation set; train ids from ``train_set``.

    When training and validation sets differ (e.g. faces vs variety), the training set's
    own images are all eligible (they share no base image with the validation set).
    """
    synth = layout.synth_dir(cfg)
    classes = [e["slug"] for e in load_catalog(cfg)]
    val_data = cached_set(synth, p["val_set"], classes, int(p["image_size"]))
    train_ids_v, val_ids = group_split(val_data.groups, float(p["val_fraction"]), int(p["split_seed"]))
    if p["train_set"] == p["val_set"]:
        train_ids = train_ids_v
    else:
        train_ids = sorted(set(cached_set(synth, p["train_set"], classes, int(p["image_size"])).groups))
    n = int(p["n_train"])
    if n:
        if n > len(train_ids):
            raise ValueError(f"n_train={n} but only {len(train_ids)} training base images in '{p['train_set']}'")
        # A seeded draw of n base images (from the training seed), so that repeats over seeds
        # also vary which images were used.
        rng = np.random.default_rng(int(p["seed"]))
        train_ids = sorted(train_ids[i] for i in rng.permutation(len(train_ids))[:n])
    return {"train_set": p["train_set"], "val_set": p["val_set"], "train_ids": train_ids, "val_ids": val_ids}


def run_finetune(cfg: dict, p: dict, out_dir: str | Path | None = None, progress: bool = True, save_model: bool = True,
                 record: dict | None = None) -> dict:
    """Train the fine-tuned classifier, evaluate it and both baselines; write the artifacts.

    :param p: stage parameters (see ``configs/tiny.yaml`` ``02_finetune``).
    :param save_model: write the classifier (stage 02); ablation runs keep only their metrics.
    :param record: more facts that identify the run, stored beside ``params`` in metrics.json
        (an ablation's thread count and the stage-01 images it learned from).
    :return: {"metrics": {...}, "history": [...], "split": {...}, "out_dir": str}
    """
    out_dir = Path(out_dir) if out_dir else layout.train_dir(cfg, p["run_name"])
    # The run is written into a staging folder and swapped into place when complete, so a killed
    # run leaves the previous one whole (never a new history.csv beside an old metrics.json).
    with run_lock(out_dir, f"the training run {out_dir.name}"), staged_dir(out_dir) as stage:
        res = _run_finetune(cfg, p, stage, progress, save_model, record)
    return {**res, "out_dir": str(out_dir)}


def _run_finetune(cfg: dict, p: dict, out_dir: Path, progress: bool, save_model: bool, record: dict | None) -> dict:
    device = profile_device(cfg)
    synth = layout.synth_dir(cfg)
    classes = [e["slug"] for e in load_catalog(cfg)]
    size = int(p["image_size"])
    split = make_split(cfg, p)
    tr_data = cached_set(synth, split["train_set"], classes, size)
    va_data = cached_set(synth, split["val_set"], classes, size)
    tr, va = tr_data.subset(rows_for(tr_data, split["train_ids"])), va_data.subset(rows_for(va_data, split["val_ids"]))
    assert not set(tr.groups) & set(va.groups) or split["train_set"] != split["val_set"]
    common = dict(
        epochs=int(p["epochs"]),
        lr=float(p["lr"]),
        batch_size=int(p["batch_size"]),
        patience=int(p["patience"]),
        seed=int(p["seed"]),
        device=device,
        progress=progress,
    )
    arch = p["backbone"]
    backbone = describe_backbone(arch, p["weights"])

    # One backbone (built, and for random weights calibrated, once); each run trains a copy.
    start = build_model(len(classes), int(p["hidden"]), p["weights"], seed=int(p["seed"]), backbone=arch)
    if p["weights"] == "none":
        calibrate_batchnorm(start, tr.x, device=device)

    metrics = {
        "backbone": backbone,
        "backbone_name": arch,
        "classes": classes,
        "n_train": len(tr.y),
        "n_val": len(va.y),
        "train_base_images": len(split["train_ids"]),
        "val_base_images": len(split["val_ids"]),
    }

    # Fine-tuned: the late stages (resnet50: layer3 + layer4) + the two-layer head.
    model = copy.deepcopy(start)
    res = train(model, tr, va, mode="finetune", **common)
    probs = predict(model, va.x, device=device)
    metrics["finetuned"] = {
        **classification_metrics(va.y.numpy(), probs.numpy(), classes),
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "trainable_params": res.trainable_params,
        "train_seconds": round(res.seconds, 2),
        # per second of training wall time, validation passes included
        "train_img_per_s_incl_val": round(len(tr.y) * len(res.history) / res.seconds, 2),
    }
    if save_model:
        save_checkpoint(model, classes, out_dir, {"hidden": int(p["hidden"]), "backbone": backbone, "image_size": size,
                                                  "run_name": p["run_name"]})
    write_history(res.history, layout.history_file(out_dir))

    # "Pretrained ResNet50" as in the paper: frozen backbone, K-way head untrained.
    base = copy.deepcopy(start)
    set_trainable(base, "none")
    metrics["pretrained"] = classification_metrics(
        va.y.numpy(), predict(base.to(device), va.x, device=device).numpy(), classes
    )

    # Linear probe: frozen backbone, trained head.
    if p["linear_probe"]:
        probe = copy.deepcopy(start)
        pres = train(probe, tr, va, mode="probe", **common)
        metrics["linear_probe"] = {
            **classification_metrics(va.y.numpy(), predict(probe, va.x, device=device).numpy(), classes),
            "best_epoch": pres.best_epoch,
            "trainable_params": pres.trainable_params,
        }
    write_json_atomic(split, layout.split_file(out_dir))
    write_json_atomic({"params": p, **({"run": record} if record else {}), **metrics}, layout.metrics_file(out_dir))
    return {"metrics": metrics, "history": res.history, "split": split}


#: Display names of the backbones in tables and figures.
BACKBONE_LABELS = {"resnet50": "ResNet50", "efficientnet_lite0": "EfficientNet-Lite0"}


def table2_rows(metrics: dict, train_desc: str, val_desc: str) -> list[dict]:
    """Table 2 rows 1-2 (+ the linear probe) from a stage-02 metrics dict, in percent.

    ``paper_row`` names the paper's row each of ours corresponds to (the backbone may differ:
    the tiny profile's is not ResNet50, and the row label says so).
    """
    net = BACKBONE_LABELS.get(metrics["backbone_name"], metrics["backbone_name"])
    rows = []
    for key, label, paper_row in (("finetuned", f"Fine-tuned {net}", "Fine-tuned ResNet50"),
                                  ("pretrained", f"Pretrained {net} (head untrained)", "Pretrained ResNet50"),
                                  ("linear_probe", f"Linear probe (frozen {net})", "")):
        if key not in metrics:
            continue
        m = metrics[key]
        rows.append({"model": label, "paper_row": paper_row, "train data": train_desc if key != "pretrained" else "",
                     "validation data": val_desc, "accuracy": round(100 * m["accuracy"], 2),
                     "macro_f1": round(100 * m["macro_f1"], 2), "mrr": round(100 * m["mrr"], 2),
                     "top3": round(100 * m.get("top3_accuracy", float("nan")), 2)})
    return rows


#: The paper's Table 2 (percent), keyed by (train set, images per class); (None, None) = the
#: untrained-head baseline. Shown beside ours, never mixed in.
PAPER_TABLE2 = {
    ("variety", 100): {"accuracy": 79.50, "macro_f1": 74.37, "mrr": 60.92},
    (None, None): {"accuracy": 8.30, "macro_f1": float("nan"), "mrr": float("nan")},
    ("variety", 70): {"accuracy": 76.90, "macro_f1": 70.17, "mrr": 62.15},
    ("variety", 50): {"accuracy": 67.90, "macro_f1": 65.50, "mrr": 55.09},
    ("variety", 30): {"accuracy": 62.20, "macro_f1": 60.48, "mrr": 60.42},
    ("faces", 70): {"accuracy": 50.30, "macro_f1": 48.33, "mrr": 47.92},
}
#: The paper's row names of Table 2 rows 1-2 -> their keys above.
PAPER_ROWS12 = {"Fine-tuned ResNet50": ("variety", 100), "Pretrained ResNet50": (None, None)}


def write_table(rows: list[dict], stem: str | Path, paper: dict | None = None) -> object:
    """Write rows as ``<stem>.csv`` and ``<stem>.md``; paper values go in separate ``paper_*`` columns.

    :param paper: :data:`PAPER_TABLE2`; each row's ``paper_row`` (a name of :data:`PAPER_ROWS12`) picks its values.

    :return: the pandas DataFrame written.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    if paper is not None:
        for col in ("accuracy", "macro_f1", "mrr"):
            df[f"paper_{col}"] = [
                paper.get(PAPER_ROWS12.get(r.get("paper_row")), {}).get(col, float("nan")) for r in rows
            ]
    stem = Path(stem)
    write_csv_atomic(df, stem.with_suffix(".csv"))
    cells = [["" if (isinstance(v, float) and v != v and not k.startswith("paper")) else str(v) for k, v in r.items()]
             for r in df.to_dict("records")]
    write_markdown_table(stem.with_suffix(".md"), list(df.columns), cells)
    return df
