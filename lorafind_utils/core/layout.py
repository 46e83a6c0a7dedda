"""The on-disk layout of a study: every artifact's path is named here, and only here.

::

    runs/<profile>/                          (the profile's ``runs_dir``; git-ignored)
        records.jsonl                        one JSON line per stage run (runner)
        models/<name>/                       tiny stand-in models built on first use
        loras/                               LoRA files (the profile's ``lora_dir``)
        synth/                               stage 01
            params.json                      every parameter of the run (a rerun must match)
            <set>/<lora>/<image>.png         one restyled image per (set, LoRA, base image)
            manifest.json                    parameters + every item + skipped inputs
        train/<run>/                         stages 02-04: one folder per classifier run
            model.safetensors  labels.json   (stage 02 only: the classifier)
            history.csv  split.json  metrics.json
        ablate/sizes.csv  ablate/domain.csv  stages 03, 04: one row per run
        thumbnails/<lora>/<image>            stage 05 queries (+ manifest.json)
        retrieval/rankings.json              stage 05 -> stage 06
        generate/figure8.json                stage 06
        index/                               stage 08: encoders/<run>/, <encoder>-<variant>/ (a faiss
                                             index: index.faiss, vectors.npy, index.json), results/
        style_lora/<run>/                    stage 07: catalog.yaml, sweep.json, style_set/, and per rank
            rank<r>/                         checkpoint/, pytorch_lora_weights.safetensors,
                                             lora_kohya.safetensors, training.json
    figures/<profile>/<name>                 tables (CSV/Markdown) and figures (PNG)
    papermill_runs/<profile>/<notebook>      executed notebooks

Functions take the profile (``cfg``) for top-level folders, and a folder for what lies inside
it, so that code given a folder (tests, benchmarks) names files the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafind_utils.core.config import project_root, resolve

MANIFEST = "manifest.json"


# --- top level ---------------------------------------------------------------------------------

def runs_dir(cfg: dict) -> Path:
    """``runs/<profile>/``: every heavy output of the profile."""
    return resolve(cfg["runs_dir"])


def figures_dir(cfg: dict) -> Path:
    """``figures/<profile>/``: tables and figures."""
    return resolve(cfg["figures_dir"])


def figure(cfg: dict, name: str) -> Path:
    """A table or figure file, e.g. ``figure(cfg, "table2.md")``; a stem without suffix is allowed
    for writers that add several suffixes."""
    return figures_dir(cfg) / name


def records_file(cfg: dict) -> Path:
    return runs_dir(cfg) / "records.jsonl"


def papermill_dir(profile_name: str) -> Path:
    return project_root() / "papermill_runs" / profile_name


def lora_dir(cfg: dict) -> Path:
    return resolve(cfg["lora_dir"])


def model_dir(cfg: dict, name: str) -> Path:
    """``runs/<profile>/models/<name>/`` (tiny stand-ins built on first use)."""
    return runs_dir(cfg) / "models" / name


def base_set_dir(cfg: dict, set_name: str) -> Path:
    """A base-image set's folder, named in the profile's ``base_images``."""
    sets = cfg["base_images"]
    if set_name not in sets:
        raise ValueError(f"unknown base-image set '{set_name}'; the profile has {sorted(sets)}")
    return resolve(sets[set_name])


# --- stage 01 ----------------------------------------------------------------------------------

def synth_dir(cfg: dict) -> Path:
    return runs_dir(cfg) / "synth"


def synth_rel(set_name: str, lora: str, image_id: str) -> str:
    """An image's path inside the synthesis folder (as the manifest records it)."""
    return f"{set_name}/{lora}/{image_id}.png"


def synth_image(synth: str | Path, set_name: str, lora: str, image_id: str) -> Path:
    return Path(synth) / synth_rel(set_name, lora, image_id)


def synth_set_dir(synth: str | Path, set_name: str) -> Path:
    """One restyled set: a folder per LoRA (the ImageFolder layout)."""
    return Path(synth) / set_name


def synth_class_dir(synth: str | Path, set_name: str, lora: str) -> Path:
    return Path(synth) / set_name / lora


def synth_params_file(synth: str | Path) -> Path:
    return Path(synth) / "params.json"


def synth_manifest(synth: str | Path) -> Path:
    return Path(synth) / MANIFEST


def read_synth_manifest(synth: str | Path) -> dict:
    """Stage 01's finished manifest; a run without one was interrupted."""
    p = synth_manifest(synth)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: stage 01 has not finished (run stage 01: `lorafind synthesize`)")
    try:
        man = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{p} is not valid JSON ({e}); run stage 01 again (`lorafind synthesize`) to rewrite it"
        ) from None
    if not isinstance(man, dict) or not all(k in man for k in ("sets", "loras", "items")):
        raise ValueError(
            f"{p} is not a stage-01 manifest (no sets/loras/items); run stage 01 again (`lorafind synthesize`)"
        )
    return man


# --- stages 02-04 ------------------------------------------------------------------------------

def train_root(cfg: dict) -> Path:
    return runs_dir(cfg) / "train"


def train_dir(cfg: dict, run: str) -> Path:
    """A classifier run's folder."""
    return train_root(cfg) / run


def model_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "model.safetensors"


def labels_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "labels.json"


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.json"


def history_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "history.csv"


def split_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "split.json"


def ablation_results(cfg: dict, name: str) -> Path:
    """Stage 03's ``sizes`` / stage 04's ``domain`` per-run table."""
    return runs_dir(cfg) / "ablate" / f"{name}.csv"


# --- stages 05-06 ------------------------------------------------------------------------------

def thumbnails_dir(cfg: dict) -> Path:
    """Query images per LoRA, ``<lora>/<image>`` (the paper: Civitai preview images)."""
    return runs_dir(cfg) / "thumbnails"


def queries_manifest(queries: str | Path) -> Path:
    return Path(queries) / MANIFEST


def query_rel(lora: str, name: str) -> str:
    return f"{lora}/{name}"


def rankings_file(cfg: dict) -> Path:
    return runs_dir(cfg) / "retrieval" / "rankings.json"


def figure8_file(cfg: dict) -> Path:
    return runs_dir(cfg) / "generate" / "figure8.json"


# --- stage 08 ----------------------------------------------------------------------------------

def index_root(cfg: dict) -> Path:
    """``runs/<profile>/index/``: style encoders and LoRA indexes."""
    return runs_dir(cfg) / "index"


def encoder_dir(cfg: dict, run: str) -> Path:
    """A trained style encoder (``encoder.safetensors`` + ``encoder.json``)."""
    return index_root(cfg) / "encoders" / run


def index_dir(cfg: dict, encoder: str, variant: str) -> Path:
    """One LoRA index (faiss + vectors + metadata), by the encoder and entry variant that built it."""
    safe = encoder.replace(":", "_").replace("/", "_")
    return index_root(cfg) / f"{safe}-{variant}"


def index_results(cfg: dict, name: str) -> Path:
    """Stage 08's per-query / per-run tables (JSON)."""
    return index_root(cfg) / "results" / f"{name}.json"


def import_dir(cfg: dict, name: str) -> Path:
    """A catalog import (``lorafind catalog import``): its own loras/, synth/, status/, catalog.yaml."""
    return runs_dir(cfg) / "imports" / name


# --- stage 07 ----------------------------------------------------------------------------------

def style_lora_dir(cfg: dict, run: str) -> Path:
    return runs_dir(cfg) / "style_lora" / run


def style_rank_dir(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / f"rank{int(rank)}"


def lora_checkpoint_dir(rank_dir: str | Path) -> Path:
    """A training run's resumable checkpoint (its files are in
    :func:`lorafind_utils.models.lora_training.train_lora`'s format)."""
    return Path(rank_dir) / "checkpoint"


def lora_diffusers_file(rank_dir: str | Path) -> Path:
    """The trained LoRA in the diffusers/PEFT layout (the name ``save_lora_weights`` writes)."""
    return Path(rank_dir) / "pytorch_lora_weights.safetensors"


def lora_kohya_file(rank_dir: str | Path) -> Path:
    """The trained LoRA in the kohya layout (Civitai / A1111 / ComfyUI)."""
    return Path(rank_dir) / "lora_kohya.safetensors"


def lora_training_record(rank_dir: str | Path) -> Path:
    return Path(rank_dir) / "training.json"


def style_set_dir(run_dir: str | Path) -> Path:
    """The demo style set made when no ``style_dir`` is given."""
    return Path(run_dir) / "style_set"


def trained_catalog(run_dir: str | Path) -> Path:
    return Path(run_dir) / "catalog.yaml"


def sweep_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "sweep.json"


# --- the paper profile's dry run ----------------------------------------------------------------

DRYRUN_BASE_NAME = "stable-diffusion-v1-5"  # the hub snapshot's folder names
DRYRUN_CONTROLNET_NAME = "sd-controlnet-canny"
DRYRUN_CLIP_NAME = "clip-vit-large-patch14"
DRYRUN_RESNET_FILE = "resnet50_random.safetensors"


@dataclass(frozen=True)
class DryRunPaths:
    """The paper profile's dry run (:mod:`lorafind_utils.dryrun`): everything under one folder."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def base(self) -> Path:
        return self.models / DRYRUN_BASE_NAME

    @property
    def controlnet(self) -> Path:
        return self.models / DRYRUN_CONTROLNET_NAME

    @property
    def clip(self) -> Path:
        return self.models / DRYRUN_CLIP_NAME

    @property
    def resnet(self) -> Path:
        return self.models / DRYRUN_RESNET_FILE

    @property
    def torch_home(self) -> Path:
        return self.models / "torch_home"

    @property
    def hf_home(self) -> Path:
        return self.root / "hf_home"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.yaml"

    @property
    def base_images(self) -> Path:
        return self.root / "base_images"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def papermill(self) -> Path:
        return self.root / "papermill"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"


def dryrun_paths(root: str | Path) -> DryRunPaths:
    return DryRunPaths(resolve(root))
