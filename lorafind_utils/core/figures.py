"""Figures drawn only from artifacts on disk."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from lorafind_utils.core.images import load_rgb, square_resize
from lorafind_utils.core.metrics import RUN_METRICS


def save_figure(fig, out_png: str | Path | None):
    """Save a figure (creating its folder) when a path is given; return it for display."""
    if out_png:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=110, bbox_inches="tight")
    return fig


def synthesis_grid(manifest: dict, synth_dir: str | Path, base_dir: str | Path, set_name: str, n_images: int = 6,
                   out_png: str | Path | None = None, resolution: int | None = None):
    """The paper's Figure 7 layout: rows = LoRAs, columns = base images (first row: the originals).

    :param manifest: the stage-01 manifest.
    :param n_images: how many base images (the first ones of the set).
    :return: the matplotlib figure (also saved to ``out_png`` when given).
    """
    synth_dir, base_dir = Path(synth_dir), Path(base_dir)
    ids = manifest["sets"][set_name][:n_images]
    loras = manifest["loras"]
    res = resolution or manifest["params"]["resolution"]
    rows = 1 + len(loras)
    fig, axes = plt.subplots(rows, len(ids), figsize=(1.3 * len(ids) + 1.2, 1.3 * rows), squeeze=False)
    by_id = {Path(f).stem: f for f in (p.name for p in base_dir.iterdir())}
    for j, img in enumerate(ids):
        axes[0, j].imshow(square_resize(load_rgb(base_dir / by_id[img]), res))
        for i, e in enumerate(loras, start=1):
            axes[i, j].imshow(Image.open(synth_dir / set_name / e["slug"] / f"{img}.png"))
    for i in range(rows):
        for j in range(len(ids)):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(
            "base image" if i == 0 else loras[i - 1]["short"], rotation=0, ha="right", va="center", fontsize=8
        )
    fig.suptitle(f"Restyled '{set_name}' images (rows: LoRA, columns: base image)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, out_png)


def training_curves(history: list[dict], best_epoch: int, out_png: str | Path | None = None, title: str = ""):
    """The paper's Figure 6: training/validation loss and accuracy per epoch (best epoch marked)."""
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        long = df.melt(
            id_vars="epoch", value_vars=[f"train_{metric}", f"val_{metric}"], var_name="split", value_name=label
        )
        long["split"] = (
            long["split"].str.replace(f"_{metric}", "", regex=False).map({"train": "training", "val": "validation"})
        )
        sns.lineplot(data=long, x="epoch", y=label, hue="split", marker="o", ax=ax)
        ax.axvline(best_epoch, color="grey", ls="--", lw=1)
        ax.set_title(f"{label} (best epoch {best_epoch})")
    fig.suptitle(title or "Fine-tuning curves", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def confusion_heatmap(matrix, names: list[str], out_png: str | Path | None = None, title: str = ""):
    """Confusion matrix (rows: true LoRA, columns: predicted) as a seaborn heatmap."""
    import numpy as np
    import seaborn as sns

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2.5, 0.5 * len(names) + 1.8))
    sns.heatmap(m, annot=True, fmt="d", cmap="Blues", cbar=False, xticklabels=names, yticklabels=names, ax=ax)
    ax.set_xlabel("predicted LoRA")
    ax.set_ylabel("true LoRA")
    ax.set_title(title or "Confusion matrix (validation)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _show(ax, im, title: str = "", color: str = "black", size: int = 8):
    ax.imshow(im)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(color)
        s.set_linewidth(3 if color != "black" else 0.5)
    if title:
        ax.set_title(title, fontsize=size, color=color)


def retrieval_figure(rows: list[dict], out_png: str | Path | None = None, title: str = ""):
    """Each query beside sample images of its top-ranked LoRAs (correct one framed in green).

    :param rows: [{"query": PIL image, "label": str, "correct": slug,
                   "top": [(slug, short name, score, PIL sample image), ...]}]
    """
    k = max(len(r["top"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.7 * (k + 1), 1.9 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        _show(ax_row[0], r["query"], r["label"], size=7)
        for j, ax in enumerate(ax_row[1:]):
            if j >= len(r["top"]):
                ax.axis("off")
                continue
            slug, name, score, sample = r["top"][j]
            ok = slug == r["correct"]
            _show(ax, sample, f"{j + 1}. {name}\n{100 * score:.1f} %", color="green" if ok else "black", size=7)
    fig.suptitle(
        title or "Queries (left) and sample images of their top-ranked LoRAs (green: the LoRA that made the query)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, out_png)


def figure8(rows: list[dict], out_png: str | Path | None = None, title: str = ""):
    """The paper's Figure 8: query | base image | generations with retrieved LoRAs, each
    captioned with its style similarity to the query.

    :param rows: [{"query": img, "query_label": str, "base": img, "base_caption": str,
                   "generations": [(img, caption, is_correct), ...]}]
    """
    k = max(len(r["generations"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 2, figsize=(2.3 * (k + 2), 2.6 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        _show(ax_row[0], r["query"], r["query_label"])
        _show(ax_row[1], r["base"], r["base_caption"])
        for ax, (im, cap, ok) in zip(ax_row[2:], r["generations"]):
            _show(ax, im, cap, color="green" if ok else "black")
    fig.suptitle(title or "Query | base image | generated with retrieved LoRAs (same base image and seed)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _np_img(t):
    return t.permute(1, 2, 0).numpy()


def rank_grid(images: dict, prompts: list[str], seed: int, out_png: str | Path | None = None, title: str = ""):
    """Prompts (rows) x models (columns: base, rank …), one seed -- the reference's comparison grid."""
    models = list(images)
    fig, axes = plt.subplots(len(prompts), len(models), figsize=(1.9 * len(models), 1.9 * len(prompts)), squeeze=False)
    for i, pr in enumerate(prompts):
        for j, m in enumerate(models):
            ax = axes[i][j]
            ax.imshow(_np_img(images[m][seed][i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(m, fontsize=9)
            if j == 0:
                ax.set_ylabel(pr[:28] + ("…" if len(pr) > 28 else ""), fontsize=7)
    fig.suptitle(title or f"Prompts × LoRA rank (seed {seed})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def base_vs_finetuned(
    images: dict, prompts: list[str], seed: int, model: str, style: list, out_png=None, title: str = ""
):
    """Three rows for the same prompts: base model, fine-tuned model, and held-out style images."""
    n = len(prompts)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.2), squeeze=False)
    for j in range(n):
        for i, (label, im) in enumerate((("base", _np_img(images["base"][seed][j])),
                                         (model, _np_img(images[model][seed][j])),
                                         ("style image", style[j % len(style)]))):
            ax = axes[i][j]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if i == 0:
                ax.set_title(prompts[j][:24] + ("…" if len(prompts[j]) > 24 else ""), fontsize=7)
    fig.suptitle(title or f"Base vs {model}, same prompts and seed; bottom: held-out style images", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def metrics_vs_rank(rows: list[dict], out_png=None, title: str = ""):
    """Each metric against the model (base, rank …), mean ± sd over seeds."""
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(rows)
    metrics = [m for m in ("fid", "kid", "lpips", "clip", "is") if m in df]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        sns.pointplot(data=df, x="model", y=m, errorbar="sd", capsize=0.2, ax=ax)
        ax.set_title(
            {"fid": "FID ↓", "kid": "KID ↓", "lpips": "LPIPS to style ↓", "clip": "CLIP score ↑", "is": "IS ↑"}[m]
        )
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(title or "Metrics by LoRA rank (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)


def loss_curves(histories: dict, out_png=None, title: str = "", window: int = 10):
    """Training loss per step for each rank (raw, faint; rolling mean over ``window`` steps)."""
    import pandas as pd

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r, h in histories.items():
        df = pd.DataFrame(h)
        line, = ax.plot(df["step"], df["loss"], alpha=0.25, lw=0.8)
        ax.plot(df["step"], df["loss"].rolling(window, min_periods=1).mean(), color=line.get_color(), label=f"rank {r}")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.legend()
    ax.set_title(title or f"LoRA training loss (rolling mean over {window} steps)")
    fig.tight_layout()
    return save_figure(fig, out_png)


# --- stages 03-05: ablation plots and tables as images ---------------------------------------

def ablation_plot(df, out_png: str | Path | None = None, title: str = ""):
    """Each metric against images per class, mean with sd error bars over seeds (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = df.melt(id_vars=["n", "seed"], value_vars=list(RUN_METRICS), var_name="metric", value_name="value")
    long["value"] *= 100
    long["metric"] = long["metric"].map({"accuracy": "accuracy", "macro_f1": "macro-F1", "mrr": "MRR",
                                         "top3_accuracy": "top-3 accuracy"})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.pointplot(data=long, x="n", y="value", hue="metric", errorbar="sd", capsize=0.15, dodge=0.3, ax=ax,
                  native_scale=True)
    k = int(df["n_val_images"].iloc[0]) // len(str(df["val_ids"].iloc[0]).split("|"))  # LoRAs = images per base image
    chance = 100 / k
    ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance ({chance:.1f} %)")
    ax.set_xlabel("training images per class (base images)")
    ax.set_ylabel("percent (mean ± sd over seeds)")
    ax.set_title(title or "Training-size ablation")
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def domain_plot(df, out_png: str | Path | None = None, title: str = ""):
    """Faces vs variety at equal size: bars with sd error bars per metric."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = df.melt(id_vars=["train_set", "seed"], value_vars=list(RUN_METRICS), var_name="metric", value_name="value")
    long["value"] *= 100
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.barplot(data=long, x="metric", y="value", hue="train_set", errorbar="sd", capsize=0.1, ax=ax)
    ax.set_ylabel("percent (mean ± sd over seeds)")
    ax.set_xlabel("")
    ax.set_title(title or "Domain (faces) vs variety, equal size, same validation set")
    return save_figure(fig, out_png)


def table_png(cells: list[list[str]], head: list[str], path: str | Path, title: str, highlight_cols: dict | None = None,
              fontsize: float = 8, width: float = 15, highlight_cells: list[tuple[int, int]] = (), caption: str = "",
              row_height: float = 0.45, auto_width: bool = True):
    """A table drawn as a PNG (cells already formatted); ``highlight_cols``: column -> header colour;
    ``highlight_cells``: (row, column) of body cells drawn green and bold (row 1 = first body row)."""
    fig, ax = plt.subplots(figsize=(width, row_height * len(cells) + 1.2 + (0.2 if caption else 0)))
    ax.axis("off")
    t = ax.table(cellText=cells, colLabels=head, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(fontsize)
    if auto_width:
        t.auto_set_column_width(list(range(len(head))))
    for j, colour in (highlight_cols or {}).items():
        t[0, j].set_facecolor(colour)
    for i, j in highlight_cells:
        t[i, j].set_facecolor("#b9e4b0")
        t[i, j].get_text().set_fontweight("bold")
    ax.set_title(title, fontsize=10)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", fontsize=8, wrap=True)
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


#: Table 3's figure shows at most this many queries (spread over all of them); the .md and .csv hold every one
TABLE3_FIGURE_ROWS = 36


def table3_png(df, ordinals: list[str], caption: str, path: Path, max_rows: int = TABLE3_FIGURE_ROWS) -> Path:
    """Table 3: one row per query, the ranked LoRAs, the correct one green; with more than ``max_rows`` queries,
    ``max_rows`` of them spread evenly over all (each keeps its ImageN label) and the caption says so."""
    import numpy as np

    rows = df.to_dict("records")
    if len(rows) > max_rows:
        keep = np.unique(np.linspace(0, len(rows) - 1, max_rows).round().astype(int))
        caption = f"{len(keep)} of the {len(rows)} queries shown, spread over all (every one: table3.md). " + caption
        rows = [rows[i] for i in keep]
    cells = [[r["query"], *[r[o] for o in ordinals], str(r["rank_of_correct"])] for r in rows]
    hits = [(i, j) for i, r in enumerate(rows, 1) for j, o in enumerate(ordinals, 1) if r[o] == r["correct"]]
    return table_png(cells, ["", *ordinals, "rank of correct"], path, "Table 3: LoRAs ranked for each query image",
                     fontsize=7.5, width=14, highlight_cells=hits, caption=caption, row_height=0.32, auto_width=False)


# --- stage 08 ---------------------------------------------------------------------------------------

def open_set_plot(panels: dict, out_png: str | Path | None = None, title: str = ""):
    """P(match) of queries in catalogued styles vs styles no LoRA paints, with the 0.5 threshold: one panel
    per ``{panel title: (known P, unknown P)}``, each group as a share of its own queries."""
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), sharey=True, squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (name, (known_p, unknown_p)) in zip(axes[0], panels.items()):
        # each group as a share of its own queries, so 81 unknown queries compare with 360 known ones
        groups = ((known_p, "catalogued styles", "#2a7ab9"), (unknown_p, "styles no LoRA paints", "#d9534f"))
        for vals, label, colour in groups:
            v = np.asarray(vals, dtype=float)
            ax.hist(v, bins=bins, weights=np.full(len(v), 100 / max(len(v), 1)), alpha=0.6, color=colour,
                    label=f"{label} ({len(v)} queries)")
        ax.axvline(0.5, color="black", ls=":", lw=1, label="threshold: below = 'none of these'")
        ax.set_xlabel("P(the catalog has the query's LoRA)")
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel("% of the group's queries")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "'None of these': calibrated P(match)")
    return save_figure(fig, out_png)


def methods_plot(df, out_png: str | Path | None = None, title: str = "", chance: dict | None = None):
    """Top-1 and MRR per retrieval method (mean ± sd over seeds), one row per method and entry variant;
    ``chance``: {"top1": %, "mrr": %} of a random ranking, drawn as dotted lines."""
    import numpy as np

    labels = [
        f"{m.replace('index: ', '')} ({e})" if isinstance(e, str) and e else m
        for m, e in zip(df["method"], df["entry"])
    ]
    y = np.arange(len(labels))[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.9))
    colours = {"top1": "#2a7ab9", "mrr": "#f0a030"}
    for j, (col, name) in enumerate((("top1", "top-1"), ("mrr", "MRR"))):
        ax.barh(y + (0.5 - j) * 0.38, df[f"{col}_mean"], 0.38, xerr=df[f"{col}_sd"].fillna(0), capsize=3, label=name,
                color=colours[col])
        if chance and col in chance:
            ax.axvline(chance[col], color=colours[col], ls=":", lw=1.2, label=f"{name} of a random ranking")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("percent (mean ± sd over the trained encoder's seeds)")
    ax.set_title(title or "Retrieval by index vs the classifier (Table 3's queries)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.16), ncol=4, frameon=False)
    return save_figure(fig, out_png)
