"""One entry point per stage, called by its notebook and by its ``lorafind`` subcommand alike.

Each takes the profile and the stage's parameters, checks them (:mod:`lorafind_utils.core.params`:
an unknown or missing key is an error naming it), runs the stage and writes its tables and
figures (:mod:`lorafind_utils.core.layout` names every file). Figures are saved and closed; a
notebook shows the saved PNGs (:func:`show`), so what it shows is what was written.

=====================  ==================================  ====================================
stage                  entry point                         command line
=====================  ==================================  ====================================
01_synthesize          :func:`synthesize`                  ``lorafind synthesize``
02_finetune            :func:`finetune`                    ``lorafind train``
03_ablate_sizes        :func:`ablate_sizes`                ``lorafind stage 03``
04_domain_vs_variety   :func:`domain_vs_variety`           ``lorafind stage 04``
05_retrieve_thumbnails :func:`retrieve`                    ``lorafind stage 05``
06_generate            :func:`generate`                    ``lorafind stage 06``
07_train_style_lora    :func:`train_style_lora`            ``lorafind train-lora``
08_index               :func:`index`                       ``lorafind stage 08`` (``lorafind index build``)
=====================  ==================================  ====================================
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, stage_params
from lorafind_utils.core.params import check_stage_params


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _plot(fn: Callable, *args, out: Path, **kw) -> Path:
    """Draw a figure with a :mod:`lorafind_utils.core.figures` function, save it to ``out``, close it."""
    _close(fn(*args, out_png=out, **kw))
    return out


def show(paths) -> None:
    """Display saved figures (PNG files) in a notebook; a no-op outside IPython."""
    try:
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return
    for p in ([paths] if isinstance(paths, (str, Path)) else list(paths)):
        display(Image(filename=str(p)))


def synthesize(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print,
               engine: str = "local", address: str | None = None) -> dict:
    """Stage 01: restyle every base image with every LoRA; grid figures (the paper's Figure 7).

    :param engine: ``local`` (this machine: one process, or worker processes on CPU) or ``ray``
        (Ray actors, one per GPU; ``address``: ``auto`` or ``HOST:PORT`` of a running cluster).

    :return: {"manifest", "synth_dir", "figures": [PNG paths]}
    """
    from lorafind_utils.core.figures import synthesis_grid
    from lorafind_utils.stages.synthesis import synthesize as run

    p = check_stage_params("01_synthesize", params, source)
    log(f"profile {cfg['name']}: {cfg['description']}")
    synth = layout.synth_dir(cfg)
    man = run(cfg, p, synth, progress=progress, engine=engine, address=address)
    log(f"{len(man['items'])} restyled images in {synth} ({len(man['skipped'])} base images skipped)")
    for s in man["skipped"]:
        log(f"skipped: {s}")
    figs = [_plot(synthesis_grid, man, synth, layout.base_set_dir(cfg, s), s, n_images=p["grid_images"],
                  out=layout.figure(cfg, f"synthesis_grid_{s}.png")) for s in p["sets"]]
    return {"manifest": man, "synth_dir": synth, "figures": figs}


def finetune(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 02: fine-tune the classifier and both baselines; Table 2 rows 1-2, Figure 6, confusion matrix.

    :return: {"metrics", "history", "table" (DataFrame), "out_dir", "figures"}
    """
    from lorafind_utils.core.figures import confusion_heatmap, training_curves
    from lorafind_utils.stages.fine_tuning import PAPER_TABLE2, run_finetune, table2_rows, write_table

    p = check_stage_params("02_finetune", params, source)
    res = run_finetune(cfg, p, progress=progress)
    m = res["metrics"]
    log(f"backbone: {m['backbone']}")
    log(f"train {m['n_train']} images ({m['train_base_images']} base images), validation {m['n_val']} "
        f"({m['val_base_images']} base images)")
    log(f"best epoch {m['finetuned']['best_epoch']} of {m['finetuned']['epochs_run']}; artifacts in {res['out_dir']}")
    rows = table2_rows(
        m, f"{m['train_base_images']} {p['train_set']} images", f"{m['val_base_images']} {p['val_set']} images"
    )
    table = write_table(rows, layout.figure(cfg, "table2_rows12"), paper=PAPER_TABLE2)
    figs = [
        _plot(
            training_curves,
            res["history"],
            m["finetuned"]["best_epoch"],
            out=layout.figure(cfg, "figure6_curves.png"),
            title=f"Fine-tuning ({m['backbone']})",
        ),
        _plot(
            confusion_heatmap,
            m["finetuned"]["confusion_matrix"],
            [e["short"] for e in load_catalog(cfg)],
            out=layout.figure(cfg, "confusion_matrix.png"),
        ),
    ]
    return {**res, "table": table, "figures": figs}


def ablate_sizes(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 03: the training-size ablation over seeds (Table 2 rows 3-5).

    :return: {"runs" (one row per run), "summary" (mean ± sd), "figures"}
    """
    from lorafind_utils.core.figures import ablation_plot
    from lorafind_utils.core.files import write_csv_atomic
    from lorafind_utils.stages.ablation import run_settings, summarize

    p = check_stage_params("03_ablate_sizes", params, source)
    runs = run_settings(cfg, [(p["train_set"], n) for n in p["sizes"]], p["seeds"], epochs=p["epochs"],
                        patience=p["patience"], workers=p["workers"], threads=p["threads"], progress=progress)
    log(f"results: {write_csv_atomic(runs, layout.ablation_results(cfg, 'sizes'))}")
    log(f"{int((~runs['reused']).sum())} runs trained, {int(runs['reused'].sum())} reused; "
        f"training time {runs['train_seconds'].sum():.0f} s; backbone {runs['backbone'].iloc[0]}")
    fig = _plot(
        ablation_plot,
        runs,
        out=layout.figure(cfg, "ablation_sizes.png"),
        title=f"Training-size ablation ({runs['backbone'].iloc[0]}, {len(p['seeds'])} seeds, {p['epochs']} epochs)",
    )
    return {"runs": runs, "summary": summarize(runs), "figures": [fig]}


def domain_vs_variety(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 04: faces vs variety at equal size, then the complete Table 2 from stages 02-04.

    :return: {"runs", "summary", "table2" (DataFrame), "files", "figures"}
    """
    import pandas as pd

    from lorafind_utils.core.figures import domain_plot
    from lorafind_utils.core.files import write_csv_atomic
    from lorafind_utils.stages.ablation import run_settings, summarize, table2, write_table2

    p = check_stage_params("04_domain_vs_variety", params, source)
    runs = run_settings(cfg, [(p["domain_set"], p["n"]), (p["variety_set"], p["n"])], p["seeds"], epochs=p["epochs"],
                        patience=p["patience"], workers=p["workers"], threads=p["threads"], progress=progress)
    log(f"results: {write_csv_atomic(runs, layout.ablation_results(cfg, 'domain'))}")
    if set(runs[runs["train_set"] == p["domain_set"]]["val_set"]) != {p["variety_set"]}:
        raise ValueError(
            f"the {p['domain_set']} runs were not validated on {p['variety_set']}: check 02_finetune's val_set"
        )
    fig = _plot(
        domain_plot,
        runs,
        out=layout.figure(cfg, "domain_vs_variety.png"),
        title=f"{p['n']} {p['domain_set']} vs {p['n']} {p['variety_set']} images per class ({len(p['seeds'])} seeds)",
    )
    sizes_csv = layout.ablation_results(cfg, "sizes")
    sizes = pd.read_csv(sizes_csv) if sizes_csv.exists() else runs.iloc[0:0]
    stage02 = layout.metrics_file(layout.train_dir(cfg, stage_params(cfg, "02_finetune")["run_name"]))
    baseline = json.loads(stage02.read_text()) if stage02.exists() else None
    t2 = table2(sizes, runs, baseline)
    files = write_table2(t2, layout.figure(cfg, "table2"))
    log(str(files))
    log(Path(files["md"]).read_text())
    return {
        "runs": runs,
        "summary": summarize(runs),
        "table2": t2,
        "files": files,
        "figures": [fig, Path(files["png"])],
    }


def retrieve(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 05: rank every LoRA for held-out queries (Table 3) with stage 02's classifier.

    :return: {"pairs", "metrics", "table3", "ranker", "skipped", "figures"}
    """
    from lorafind_utils.core.config import resolve
    from lorafind_utils.core.figures import retrieval_figure
    from lorafind_utils.rank.classifier_ranker import Ranker, lora_samples
    from lorafind_utils.stages.retrieval import (
        evaluate_queries,
        example_rows,
        make_queries,
        rank_queries,
        read_queries,
        save_rankings,
        table3,
        write_table3,
    )

    p = check_stage_params("05_retrieve_thumbnails", params, source)
    catalog = load_catalog(cfg)
    qdir = resolve(p["queries_dir"]) if p["queries_dir"] else layout.thumbnails_dir(cfg)
    if p["make_queries"]:
        qp = dict(stage_params(cfg, "01_synthesize"), prompts=p["prompts"], query_set=p["query_set"],
                  images_per_lora=p["images_per_lora"], seed=p["query_seed"], strength=p["strength"],
                  guidance_scale=p["guidance_scale"], style_query_set=p["style_query_set"],
                  style_query_images=p["style_query_images"])
        make_queries(cfg, qp, qdir, progress=progress)
    ranker = Ranker.from_profile(cfg, p["run_name"] or None)
    log(f"classifier: {ranker.backbone}, input {ranker.size} px")
    pairs, skipped = rank_queries(ranker, read_queries(qdir, catalog))
    for s in skipped:
        log(f"skipped: {s}")
    metrics = evaluate_queries(pairs, len(catalog))
    save_rankings(pairs, metrics, ranker, skipped, layout.rankings_file(cfg))
    t3 = table3(pairs, catalog)
    files = write_table3(t3, metrics["all"], layout.figure(cfg, "table3"))
    log(str(files))
    for kind, m in metrics.items():
        log(f"{kind:>14}: {m['queries']} queries, top-1 {100 * m['top1']:.1f} %, top-3 {100 * m['top3']:.1f} %, "
            f"top-6 {100 * m['top6']:.1f} %, MRR {100 * m['mrr']:.1f} %")
    fig = _plot(retrieval_figure, example_rows(pairs, lora_samples(cfg), p["figure_queries"], p["figure_top"]),
                out=layout.figure(cfg, "retrieval_examples.png"))
    return {"pairs": pairs, "metrics": metrics, "table3": t3, "ranker": ranker, "skipped": skipped,
            "figures": [Path(files["png"]), fig]}


def generate(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 06: regenerate with the retrieved LoRAs (Figure 8), each scored by style similarity.

    :return: {"records", "figures"}
    """
    from lorafind_utils.core.figures import figure8
    from lorafind_utils.core.files import write_json_atomic
    from lorafind_utils.core.images import read_base_set
    from lorafind_utils.rank.classifier_ranker import Ranker
    from lorafind_utils.stages.generation import figure8_rows, prepare_base

    p = check_stage_params("06_generate", params, source)
    p01 = stage_params(cfg, "01_synthesize")
    rank_file = layout.rankings_file(cfg)
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} not found: run stage 05 (05_retrieve_thumbnails) first")
    rankings = json.loads(rank_file.read_text())
    ranker = Ranker.from_profile(cfg, rankings["classifier"] or None)
    bases = read_base_set(layout.base_set_dir(cfg, p["base_set"]))
    chosen = next((b for b in bases if b.id == p["base_image"]), None) if p["base_image"] else bases[0]
    if chosen is None:
        raise ValueError(f"no base image '{p['base_image']}' in set {p['base_set']}")
    base = prepare_base(chosen.path, int(p01["resolution"]), int(p01["canny_low"]), int(p01["canny_high"]))
    rows, records = figure8_rows(cfg, rankings, p["queries"], base, p["seed"], p01, ranker, progress=progress)
    write_json_atomic(
        {
            "measure": "cosine similarity of Gram matrices of the classifier backbone's early frozen features",
            "records": records,
        },
        layout.figure8_file(cfg),
    )
    for r in records:
        gens = ", ".join(
            f"{g['lora']} (rank {g['rank']}{', correct' if g['correct'] else ''}): {g['style_similarity']:.3f}"
            for g in r["generations"]
        )
        log(f"{r['query']}: base {r['base_similarity']:.3f}; {gens}")
    fig = _plot(figure8, rows, out=layout.figure(cfg, "figure8.png"))
    return {"records": records, "figures": [fig]}


def train_style_lora(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 07: one style LoRA per rank, scored against held-out style images; the rank table and figures.

    :return: run_sweep's result plus {"table", "files", "figures"}
    """
    from lorafind_utils.core.figures import base_vs_finetuned, loss_curves, metrics_vs_rank, rank_grid
    from lorafind_utils.stages.style_lora import run_sweep, sweep_table, write_sweep_table

    p = check_stage_params("07_train_style_lora", params, source)
    res = run_sweep(cfg, p, progress=progress)
    log(f"{res['n_train']} training / {res['n_heldout']} held-out style images from {res['style_dir']}")
    for r, sps in res["steps_per_s"].items():
        h = res["histories"][r]
        k = min(20, len(h))
        first, last = sum(x["loss"] for x in h[:k]) / k, sum(x["loss"] for x in h[-k:]) / k
        log(f"rank {r}: {sps:.2f} steps/s; loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k})")
    log(f"catalog with the trained LoRAs: {res['catalog']}")
    table = sweep_table(res["rows"])
    notes = (f"FID/KID/IS network: {res['feature_net']}; LPIPS AlexNet backbone: {res['lpips_backbone']}; "
             f"CLIP: {res['clip_model']}. {res['n_heldout']} held-out style images as the reference; "
             f"{len(p['eval_prompts'])} prompts x {len(p['eval_seeds'])} seeds per model.")
    files = write_sweep_table(table, layout.figure(cfg, "style_lora_ranks"), notes)
    log(Path(files["md"]).read_text())
    seed0, prompts = p["eval_seeds"][0], p["eval_prompts"]
    figs = [_plot(loss_curves, res["histories"], out=layout.figure(cfg, "style_lora_loss.png")),
            _plot(rank_grid, res["images"], prompts, seed0, out=layout.figure(cfg, "style_lora_grid.png")),
            _plot(base_vs_finetuned, res["images"], prompts, seed0, f"rank {p['ranks'][-1]}", res["style_images"],
                  out=layout.figure(cfg, "style_lora_base_vs_ft.png")),
            _plot(metrics_vs_rank, res["rows"], out=layout.figure(cfg, "style_lora_metrics.png"))]
    return {**res, "table": table, "files": files, "figures": figs}


def index(cfg: dict, params: dict, source: str = "parameters", progress: bool = True, log=print) -> dict:
    """Stage 08: the style-embedding index against the classifier; builds the profile's index.

    :return: stage 08's results (methods, folds, open_set, add, latency_ms, thumbnails_vs_synth, style_lora) + figures
    """
    from lorafind_utils.core.figures import methods_plot, open_set_plot
    from lorafind_utils.stages.index_study import run_stage

    p = check_stage_params("08_index", params, source)
    res = run_stage(cfg, p, progress=progress, log=log)
    for name in (
        "index_methods.md",
        "index_leave_out.md",
        "index_open_set.md",
        "index_costs.md",
        "index_style_lora.md",
    ):
        if layout.figure(cfg, name).exists():
            log(layout.figure(cfg, name).read_text())
    chance = {m: 100 * v for m, v in res["chance"].items()}
    figs = [_plot(methods_plot, res["methods_df"], chance=chance, out=layout.figure(cfg, "index_methods.png"))]
    if res["open_set_panels"]:
        figs.append(_plot(open_set_plot, res["open_set_panels"], out=layout.figure(cfg, "index_open_set.png")))
    return {**res, "figures": figs}


#: stage name -> entry point
STAGES: dict[str, Callable] = {
    "01_synthesize": synthesize,
    "02_finetune": finetune,
    "03_ablate_sizes": ablate_sizes,
    "04_domain_vs_variety": domain_vs_variety,
    "05_retrieve_thumbnails": retrieve,
    "06_generate": generate,
    "07_train_style_lora": train_style_lora,
    "08_index": index,
}


def stage_name(key: str) -> str:
    """``03`` or ``03_ablate_sizes`` -> ``03_ablate_sizes``."""
    hits = [s for s in STAGES if key in (s, s[:2])]
    if not hits:
        raise ValueError(f"no stage '{key}'; the stages are {', '.join(STAGES)}")
    return hits[0]


def run(stage: str, cfg: dict, params: dict | None = None, source: str = "parameters", **kw) -> dict:
    """Run one stage by name with the given parameters (default: the profile's)."""
    name = stage_name(stage)
    if params is None:
        params, source = stage_params(cfg, name), f"profile {cfg['name']}"
    return STAGES[name](cfg, params, source=source, **kw)
