"""Dry run of the ``paper`` profile on CPU: its code path and settings, with only the counts cut.

The paper profile needs a GPU box with model access. This module runs it here, offline, so that
a bug on its path (512 px, ResNet50 at 224 px with the paper's trainable layers, the paper's LoRA
layouts, full-size SD1.5 + ControlNet-Canny) is found before GPU time is spent:

* **Models** are the published architectures (:mod:`lorafind_utils.models.hub_configs`) with seeded
  random weights, written with ``save_pretrained`` in the hub snapshot's layout
  (``models/stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer,scheduler,feature_extractor}``
  + ``model_index.json``; ``models/sd-controlnet-canny/``) and loaded by the very
  ``from_pretrained`` calls the paper profile makes (``models.base``/``controlnet`` point at the
  folders; ``models.kind`` stays ``hub``).
* **LoRAs**: full-size kohya files with random weights in the real key layout, named after
  entries of ``data/loras/paper.yaml``: a kohya LoRA with text-encoder keys, a kohya LoCon
  (3x3 conv keys, its own conv rank) and a UNet-only LoRA (fp16 tensors, as Civitai ships them).
* **ResNet50** with seeded random weights through stage 02's ``weights:`` path option.
* **Stage 05** reads "thumbnails" (stand-in photos in ``<runs_dir>/thumbnails/<slug>/``, with the
  manifest ``lorafind fetch`` writes): the paper's ``make_queries: false`` path.
* **Stage 07** keeps the paper's metric networks: the FID/KID/IS Inception (torch-fidelity) and
  LPIPS's ImageNet AlexNet load through ``torch.hub`` from a ``TORCH_HOME`` under the dry-run
  folder that holds seeded random weights under the real file names (a cached file is not
  re-verified); the CLIP score uses a seeded full-size ``openai/clip-vit-large-patch14`` folder.

Everything lies under one folder (``runs/dryrun/``, removable with ``make clean-dryrun``). The
study runs through :func:`lorafind_utils.engines.runner.run_study` (papermill, notebooks 01-07), as on a
GPU box. ``report.json`` and ``report.md`` there hold, per stage, wall time, peak RSS (the
runner's records) and disk written; the FLOPs of one restyled 512-px image and of one ResNet50
training image (``torch.utils.flop_counter.FlopCounterMode``), and the resulting estimate of the
whole paper study on a named GPU.

``python -m lorafind_utils.dryrun [--keep-models] [--smoke]``
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from lorafind_utils.core import layout
from lorafind_utils.core.config import merge
from lorafind_utils.core.files import tree_bytes
from lorafind_utils.core.layout import DryRunPaths as Paths
from lorafind_utils.dryrun.cost import (
    GPUS,
    gpu_estimate,
    lora_training_activation_gb,
    measure_flops,
    paper_workload,
    per_image_flops,
)
from lorafind_utils.dryrun.fixtures import (
    DEFAULT,
    DRYRUN_DIR,
    SMOKE,
    Counts,
    dryrun_paths,
    has_torch_fidelity,
    prepare_images,
    prepare_loras,
    prepare_models,
)
from lorafind_utils.engines.runner import PeakRSS

# ---------------------------------------------------------------------------------------------
# Models: published configs, seeded random weights, the hub snapshot's layout
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# LoRAs: full-size kohya key sets with seeded random weights
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Images: base sets and stage-05 thumbnails from the repository's own photos
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The profile overrides
# ---------------------------------------------------------------------------------------------


def overrides(paths: Paths, counts: Counts = DEFAULT, threads: int | None = None, extra: dict | None = None) -> dict:
    """What :func:`~lorafind_utils.core.config.load_profile` ("paper", overrides) needs for the dry run:
    the local models, catalog, LoRA folder, base images and output folders, ``device: cpu`` and the
    counts cut down; every other parameter stays the paper profile's.

    :param threads: torch threads for the one worker of stages 01/03/04 (default: all cores).
    :param extra: more overrides merged over these (tests: a smaller resolution).
    """
    from lorafind_utils.core.config import load_profile

    counts.check()
    threads = int(threads or os.cpu_count() or 1)
    paper = load_profile("paper")["stages"]
    p07 = paper["07_train_style_lora"]
    feature_net = (
        p07["feature_net"] if has_torch_fidelity() or p07["feature_net"] != "inception" else "efficientnet_lite0"
    )
    ov = {
        "description": (
            f"Dry run of the paper profile on CPU: its settings with the counts cut ({counts.loras} LoRAs x "
            f"{counts.images} base images per set, {counts.steps} steps, {counts.epochs} epoch), seeded "
            "random weights in the published architectures. Its numbers measure time and memory only."
        ),
        "device": "cpu",
        "models": {"base": str(paths.base), "controlnet": str(paths.controlnet)},
        "catalog": str(paths.catalog),
        "lora_dir": str(paths.loras),
        "base_images": {"variety": str(paths.base_images / "variety"), "faces": str(paths.base_images / "faces")},
        "runs_dir": str(paths.runs),
        "figures_dir": str(paths.figures),
        "stages": {
            # CPU: one worker with every core (a second 512-px pipeline would double the ~6 GB);
            # float32 (load_pipeline uses float32 on CPU whatever the profile says).
            "01_synthesize": {
                "steps": counts.steps,
                "max_images": counts.images,
                "batch_size": counts.images,
                "dtype": "float32",
                "workers": 1,
                "threads": threads,
            },
            "02_finetune": {"epochs": counts.epochs, "weights": str(paths.resnet)},
            "03_ablate_sizes": {
                "sizes": list(counts.sizes),
                "seeds": list(counts.seeds),
                "epochs": counts.epochs,
                "workers": 1,
                "threads": threads,
            },
            "04_domain_vs_variety": {
                "n": counts.n_domain,
                "seeds": list(counts.seeds),
                "epochs": counts.epochs,
                "workers": 1,
                "threads": threads,
            },
            "05_retrieve_thumbnails": {},  # the paper's: make_queries false, <runs_dir>/thumbnails
            "06_generate": {"queries": list(counts.queries)},
            "07_train_style_lora": {
                "n_style_images": counts.style_images,
                "ranks": list(counts.ranks),
                "steps": counts.lora_steps,
                "batch_size": counts.lora_batch,
                "eval_prompts": list(p07["eval_prompts"][: counts.eval_prompts]),
                "eval_seeds": list(counts.eval_seeds),
                "infer_steps": counts.infer_steps,
                "feature_net": feature_net,
                "clip_model": str(paths.clip),
            },
            "08_index": {
                "epochs": counts.index_epochs,
                "seeds": list(counts.seeds),
                "add_images": counts.add_images,
                "open_set_images": counts.open_set_images,
                "folds": counts.folds,
                "latency_queries": counts.latency_queries,
                "latency_entries": counts.latency_entries,
            },
        },
    }
    if extra:
        ov = merge(ov, extra)
    return ov


def deviations(ov: dict) -> list[str]:
    """Every setting in which the dry run differs from the paper profile (besides paths)."""
    from lorafind_utils.core.config import load_profile

    paper = load_profile("paper")
    out = []
    for stage, values in ov["stages"].items():
        for k, v in values.items():
            if paper["stages"][stage][k] != v and k not in ("weights", "clip_model"):
                out.append(f"{stage}.{k}: {paper['stages'][stage][k]!r} -> {v!r}")
    out.append(f"device: {paper['device']!r} -> 'cpu'")
    out.append("02_finetune.weights: imagenet -> seeded random ResNet50 file (the `weights: <path>` option)")
    out.append(
        "07_train_style_lora.clip_model: openai/clip-vit-large-patch14 -> a seeded random folder of that architecture"
    )
    out.append(
        "07_train_style_lora metric networks (Inception for FID/KID/IS, LPIPS AlexNet): the paper's, with seeded "
        "random weights in a TORCH_HOME under the dry-run folder"
        + (
            ""
            if has_torch_fidelity()
            else "; feature_net inception -> efficientnet_lite0 (torch-fidelity is not installed)"
        )
    )
    out.append(f"models: the published SD1.5 / ControlNet-Canny architectures with seeded random weights; catalog: "
               f"{ov['catalog']} ({len(yaml_loras(ov['catalog']))} stand-in LoRAs named after data/loras/paper.yaml)"
               if Path(ov["catalog"]).exists() else "models: seeded random weights")
    out.append("base images: the repository's own photos (data/images/variety, faces); stage-05 thumbnails: "
               "other photos of data/images/variety in place of the Civitai previews")
    return out


def yaml_loras(path) -> list:
    import yaml

    return yaml.safe_load(Path(path).read_text())["loras"]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (papermill's kernels)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class StageDisk:
    """A ``log`` for :func:`~lorafind_utils.engines.runner.run_study` that measures the disk each notebook
    writes: the dry-run folder's size (models excluded) when the runner announces a notebook and
    when it reports it done."""

    START = re.compile(r"^\[(\d\d_[A-Za-z0-9_]+)\] running")
    DONE = re.compile(r"^\[(\d\d_[A-Za-z0-9_]+)\] done")

    def __init__(self, root: Path, exclude: tuple[Path, ...], log=print):
        self.root, self.exclude, self.log = root, exclude, log
        self.before: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.cpu0: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}  # CPU seconds of the notebook's kernel (and its workers), once reaped
        self.started: dict[str, float] = {}
        self.current: str | None = None

    def size(self) -> int:
        return tree_bytes(self.root, self.exclude)

    def __call__(self, msg: str) -> None:
        m = self.START.match(msg)
        if m:
            self.current = m.group(1)
            self.before[self.current] = self.size()
            self.started[self.current] = time.time()
            self.cpu0[self.current] = _children_cpu()
        self.log(msg)
        m = self.DONE.match(msg)
        if m:
            self.close(m.group(1))

    def close(self, stage: str | None = None) -> None:
        stage = stage or self.current
        if stage and stage in self.before and stage not in self.written:
            self.written[stage] = self.size() - self.before[stage]
            self.cpu_s[stage] = round(_children_cpu() - self.cpu0[stage], 1)


@contextmanager
def environment(paths: Paths):
    """The environment of the dry run (inherited by papermill's kernels and their workers): offline,
    the metric networks' torch.hub cache, an empty Hugging Face cache."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(paths.hf_home),
           "TORCH_HOME": str(paths.torch_home), "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# FLOPs (torch.utils.flop_counter on meta-device models: exact counts, no memory, seconds)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mb(b: float) -> float:
    return round(b / 2**20, 1)


def write_report(paths: Paths, report: dict) -> None:
    from lorafind_utils.core.files import write_json_atomic

    write_json_atomic(report, paths.report_json)
    lines = ["# Dry run of the paper profile on CPU", "",
             f"{report['started']} · {report['machine']} · total {report['total_s']:.0f} s "
             f"({report['total_s'] / 60:.1f} min) · status **{report['status']}**", "",
             "| stage | wall s | CPU s | peak RSS MB | disk MB written |", "|---|---:|---:|---:|---:|"]
    for r in report["stages"]:
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "—"
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {cpu} | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.1f} |")
    lines.append(
        f"| **total** | **{report['total_s']:.0f}** | | **{max(r['peak_rss_mb'] for r in report['stages']):.0f}** "
        f"| **{sum(r['disk_mb'] for r in report['stages']):.0f}** |"
    )
    la = report.get("load_average")
    lines += ["", "Preparation rows: this process (peak RSS of the dry-run process); notebook rows: the runner's "
              "records (kernel and its workers, RSS summed); CPU s: the kernel's user + system time. Disk: growth "
              "of the dry-run folder (the models' row: what stays while it runs; they are removed at the end "
              "unless --keep-models)."
              + (f" Load average (1 min) at start / end: {la[0]:.1f} / {la[1]:.1f} on {os.cpu_count()} cores: "
                 "other processes shared the CPU, so wall times are upper bounds; CPU seconds are not inflated "
                 "that way." if la else ""), ""]
    if report.get("error"):
        lines += [f"**Failed:** {report['error']}", ""]
    fl = report.get("flops")
    if fl:
        f, w, g = fl["components"], fl["paper_workload"], fl["gpu_estimate"]
        T = 1e12
        lines += ["## FLOPs (torch.utils.flop_counter.FlopCounterMode, full-size models)", "",
                  "| piece | TFLOPs |", "|---|---:|"]
        lines += [f"| {k} | {v / T:.3f} |" for k, v in f.items()]
        lines += [
            "",
            f"Per restyled 512-px image (paper stage 01: text encoder + VAE encode + "
            f"{fl['restyle_steps']} x (UNet + ControlNet) + VAE decode): **{w['per_restyled_image'] / T:.2f} TFLOPs**; "
            f"per ResNet50 training image at 224 px: **{f['resnet_train_image'] / 1e9:.1f} GFLOPs** "
            f"(evaluation {f['resnet_eval_image'] / 1e9:.1f}).",
            "",
            f"## Estimate of the whole paper study on one {g['gpu']}",
            "",
            f"At {100 * g['utilisation']:.0f} % of its {g['peak_flops'] / T:.0f} TFLOP/s dense fp16 peak; "
            f"assumptions: {w['assumptions']}.",
            "",
            "| stage | work | PFLOPs | GPU hours |",
            "|---|---|---:|---:|",
        ]
        for k, v in w["stages"].items():
            lines.append(f"| {k} | {v['what']} | {v['flops'] / 1e15:.1f} | {g['stages_h'][k]:.2f} |")
        lines += [
            f"| **total** | | {w['total'] / 1e15:.1f} | **{g['total_h']:.1f}** |",
            "",
            f"Check against published throughput: {g['benchmark_setting']} is "
            f"{g['benchmark_flops_per_image'] / T:.1f} TFLOPs per image, so the assumed utilisation implies "
            f"{g['implied_img_per_s']:.2f} images/s; diffusers' benchmarks report about "
            f"{g['published_a100_img_per_s'][0]}-{g['published_a100_img_per_s'][1]} images/s on an A100, i.e. "
            f"{100 * g['published_implies_utilisation'][0]:.0f}-{100 * g['published_implies_utilisation'][1]:.0f} % "
            f"utilisation; at those, the whole study takes {g['total_h_at_published_utilisation'][0]:.1f}-"
            f"{g['total_h_at_published_utilisation'][1]:.1f} h. Not measured on a GPU.",
            "",
        ]
    if fl and fl.get("memory"):
        lines += ["## Stage 07 training memory (meta-device count of what autograd keeps for backward)", ""]
        lines += [f"- {k}: {v} GB" for k, v in fl["memory"].items()]
        lines += ["", "In fp32 the paper's batch 4 leaves little headroom on a 40 GB GPU (activations + weights "
                  "~33 GB before CUDA's own); train_lora now trains under fp16 autocast on CUDA (about half the "
                  "activations).", ""]
    if fl:
        lines += [
            "The FLOP estimate is a lower bound where the work is small (stages 02-06, 08: data loading, "
            "Python and kernel launches dominate a 224-px ResNet50 at batch 32), and it assumes fp16 on tensor "
            "cores: stage 07's training ran in fp32 before this change (A100 fp32 without tensor cores: "
            "19.5 TFLOP/s, about 16x slower than the fp16 peak); its evaluation pipeline still loads in fp32.",
            "",
        ]
    lines += ["## Settings that differ from the paper profile", ""] + [f"- {d}" for d in report["deviations"]] + [""]
    paths.report_md.write_text("\n".join(lines))


def flops_section(ov_stage01: dict, gpu: str = "A100 40GB", utilisation: float = 0.3) -> dict:
    """The report's FLOPs: the pieces, the paper's workload, the GPU estimate."""
    from lorafind_utils.core.config import load_profile
    from lorafind_utils.models import hub_configs as C

    comp = measure_flops()
    work = paper_workload(comp)
    est = gpu_estimate(comp, work, gpu, utilisation)
    p1 = load_profile("paper")["stages"]["01_synthesize"]
    p7 = load_profile("paper")["stages"]["07_train_style_lora"]
    memory = {
        "lora_train_activations_gb_fp32_batch1": round(lora_training_activation_gb(1), 2),
        f"lora_train_activations_gb_fp32_batch{p7['batch_size']}": round(
            lora_training_activation_gb(p7["batch_size"]), 2
        ),
        "sd15_unet_vae_text_encoder_weights_gb_fp32": round(
            4 * (C.SD15_UNET_PARAMS + C.SD15_VAE_PARAMS + C.SD15_TEXT_ENCODER_PARAMS) / 2**30, 2
        ),
    }
    return {"components": comp, "paper_workload": work, "gpu_estimate": est, "memory": memory,
            "restyle_steps": int(p1["steps"] * p1["strength"]),
            "dryrun_restyle_image": per_image_flops(comp, ov_stage01["steps"], p1["strength"]),
            "note": "counted on meta-device models of the published architectures (exact shapes)"}


def rewrite_report(root: str | Path | None = None, gpu: str = "A100 40GB", utilisation: float = 0.3) -> dict:
    """Recount the FLOPs and the estimate (another GPU or utilisation) and rewrite an earlier run's report."""
    paths = dryrun_paths(root)
    report = json.loads(paths.report_json.read_text())
    report["flops"] = flops_section(report["overrides"]["stages"]["01_synthesize"], gpu, utilisation)
    report["deviations"] = deviations(report["overrides"])
    write_report(paths, report)
    return report


def run_dryrun(root: str | Path | None = None, counts: Counts = DEFAULT, keep_models: bool = False,
               only: list[str] | None = None, start: str | None = None, threads: int | None = None, seed: int = 0,
               gpu: str = "A100 40GB",
               utilisation: float = 0.3, log=print) -> dict:
    """Prepare the dry-run folder, run notebooks 01-07 of the paper profile through the runner,
    count FLOPs, write ``report.json`` and ``report.md``.

    Earlier outputs are removed first (the measurements are of a fresh run) unless ``only`` or
    ``start`` ask for a part, which continues them; the models are rebuilt unless ``keep_models``
    and they are in place, and deleted at the end unless ``keep_models``.

    :param only: notebooks to run (``["01"]``), ``start``: from this one on; default all.
    :return: the report.
    """
    from lorafind_utils.engines import runner

    counts.check()
    paths = dryrun_paths(root)
    t_start = time.perf_counter()
    fresh = not (only or start)  # a partial run continues the earlier one's outputs
    for p in (paths.runs, paths.figures, paths.papermill, paths.loras, paths.base_images, paths.hf_home,
              paths.catalog, paths.report_json, paths.report_md) if fresh else ():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    paths.root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": asdict(counts), "status": "running",
              "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "root": str(paths.root), "stages": []}
    prep = [("prepare: models", lambda: prepare_models(paths, seed, reuse=keep_models, log=log), paths.models),
            ("prepare: LoRAs + catalog", lambda: prepare_loras(paths, counts, seed), None),
            ("prepare: base images + thumbnails", lambda: prepare_images(paths, counts), None)]
    for name, fn, _ in prep:
        before = tree_bytes(paths.root)
        t0 = time.perf_counter()
        with PeakRSS(interval=0.2, children=False) as mem:
            info = fn()
        report["stages"].append({"stage": name, "wall_s": round(time.perf_counter() - t0, 2),
                                 "peak_rss_mb": _mb(mem.peak), "disk_mb": _mb(tree_bytes(paths.root) - before),
                                 "info": info if isinstance(info, dict) else {"files": info}})
        log(f"{name}: {report['stages'][-1]['wall_s']} s")
    ov = overrides(paths, counts, threads)
    report["overrides"] = ov
    report["deviations"] = deviations(ov)
    disk = StageDisk(paths.root, (paths.models,), log)
    from lorafind_utils.core.records import read_records

    records = layout.records_file({"runs_dir": str(paths.runs)})
    n_before = len(read_records(records))
    error = None
    with environment(paths):
        try:
            runner.run_study("paper", only=only, start=start, overrides=ov, output_dir=paths.papermill, log=disk)
        except runner.StageFailed as e:
            error = str(e)
            disk.close()
    earlier = {}  # a partial run keeps the earlier run's rows of the notebooks it did not run
    if not fresh and paths.report_json.exists():
        old = json.loads(paths.report_json.read_text())
        earlier = {r["stage"]: r for r in old.get("stages", []) if r["stage"][:2].isdigit()}
    rows = []
    for rec in read_records(records)[n_before:]:
        earlier.pop(rec["stage"], None)
        rows.append({"stage": rec["stage"], "wall_s": rec["wall_s"], "peak_rss_mb": rec["peak_rss_mb"],
                                 "disk_mb": _mb(disk.written.get(rec["stage"], 0)),
                                 "cpu_s": disk.cpu_s.get(rec["stage"]), "status": rec["status"],
                                 **({"error": rec["error"]} if rec.get("error") else {})})
    report["stages"] += sorted(list(earlier.values()) + rows, key=lambda r: r["stage"])
    t0 = time.perf_counter()
    with PeakRSS(interval=0.2, children=False) as mem:
        report["flops"] = flops_section(ov["stages"]["01_synthesize"], gpu, utilisation)
    report["stages"].append({"stage": "FLOP count (meta device)", "wall_s": round(time.perf_counter() - t0, 2),
                             "peak_rss_mb": _mb(mem.peak), "disk_mb": 0.0})
    if not keep_models and paths.models.exists():
        shutil.rmtree(paths.models)
        log(f"models removed ({paths.models}); --keep-models keeps them for the next run")
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["load_average"] = [load0, os.getloadavg()[0]]
    report["status"] = "failed" if error else "ok"
    if error:
        report["error"] = error
    write_report(paths, report)
    log(f"report: {paths.report_md}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorafind_utils.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-models", action="store_true",
                    help="reuse the models already in runs/dryrun/models and keep them afterwards (~8 GB)")
    ap.add_argument(
        "--smoke", action="store_true", help="the smallest counts (4 LoRAs x 3 images per set, 1 denoising step)"
    )
    ap.add_argument("--only", nargs="+", help="run only these notebooks (e.g. 01 02), continuing an earlier run")
    ap.add_argument("--from", dest="start", help="start at this notebook (e.g. 05), continuing an earlier run")
    ap.add_argument("--root", default=DRYRUN_DIR, help="the dry-run folder (default runs/dryrun)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--gpu", default="A100 40GB", choices=sorted(GPUS), help="GPU of the estimate")
    ap.add_argument("--utilisation", type=float, default=0.3, help="assumed share of the GPU's dense fp16 peak")
    ap.add_argument("--report-only", action="store_true", help="recount FLOPs and rewrite an earlier run's report")
    a = ap.parse_args(argv)
    if a.report_only:
        rewrite_report(a.root, a.gpu, a.utilisation)
        print(Path(dryrun_paths(a.root).report_md).read_text())
        return 0
    report = run_dryrun(a.root, SMOKE if a.smoke else DEFAULT, keep_models=a.keep_models, only=a.only,
                        start=a.start, threads=a.threads, gpu=a.gpu, utilisation=a.utilisation)
    print(Path(dryrun_paths(a.root).report_md).read_text())
    return 0 if report["status"] == "ok" else 1
