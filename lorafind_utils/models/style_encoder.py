"""Style encoders: an image -> a unit vector in which images painted by one LoRA lie close.

* ``trained``: stage 02's backbone (same trainable late stages) + a two-layer projection head,
  trained with a supervised-contrastive loss (``pytorch-metric-learning``'s ``SupConLoss``) on
  stage 01's restyled images. A batch is a few base images under *every* LoRA, so each image's
  positives are the same LoRA on other base images and its hardest negatives are the same base
  image under the other LoRAs: the encoder must learn the style and ignore the content.
* ``imagenet``: the frozen ImageNet backbone's pooled features (training-free baseline).
* ``gram``: Gram matrices of the backbone's early, frozen ImageNet features (Gatys et al.;
  texture and colour statistics independent of layout; training-free baseline).
* ``gramstats``: richer training-free statistics -- the Gram matrix and per-channel mean and sd of
  every frozen early stage, the pixels' colour moments and colour histogram -- standardised and
  PCA-whitened on stage 01's training images of the LoRAs it may see (:func:`fit_gramstats`; no
  gradient step). The whitening is what is fitted, so LoRAs left out of the fit still land apart.
* ``clip:<hub id or folder>``: a CLIP image encoder through ``from_pretrained`` (paper profile).

Every encoder describes itself (:meth:`StyleEncoder.describe`): an index records it and refuses
queries from another one.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorafind_utils.core.files import atomic_path
from lorafind_utils.core.images import ImageError, load_rgb, square_resize
from lorafind_utils.models.classifier import (
    augment_batch,
    build_model,
    describe_backbone,
    early_stages,
    normalize,
    set_trainable,
    train_mode,
)

ENCODERS = ("trained", "gramstats", "imagenet", "gram")
#: the encoders fitted to the LoRAs they may see (saved under ``runs/<profile>/index/encoders/``)
FITTED = ("trained", "gramstats")


def _to_uint8(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])


class StyleEncoder:
    """Embeds uint8 images [N, 3, S, S] (any S; resized to ``image_size``) into unit vectors."""

    def __init__(self, kind: str, model: torch.nn.Module, image_size: int, backbone: str, dim: int,
                 weights_sha256: str = "", device: str = "cpu", extra: dict | None = None):
        self.kind, self.model, self.image_size, self.backbone, self.dim = kind, model, image_size, backbone, dim
        self.weights_sha256, self.device, self.extra = weights_sha256, device, extra or {}
        self.model.to(device).eval()

    # --- identity ------------------------------------------------------------------------------
    def describe(self) -> dict:
        """What an index stores about the encoder that built it (and checks on load)."""
        return {"name": self.kind, "backbone": self.backbone, "dim": self.dim, "image_size": self.image_size,
                "sha256": self.weights_sha256, **self.extra}

    # --- embedding -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, dim) float32 unit vectors for uint8 images [N, 3, S, S]."""
        self.model.eval()
        out = []
        for i in range(0, len(x), batch_size):
            xb = normalize(x[i : i + batch_size].to(self.device), self.image_size)
            out.append(self._forward(xb).float().cpu())
        z = torch.cat(out) if out else torch.zeros(0, self.dim)
        return F.normalize(z, dim=1).numpy().astype(np.float32)

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        if self.kind == "trained":
            return self.model(xb)
        if self.kind == "imagenet":
            return self.model.features(xb)
        if self.kind == "gram":
            return gram_features(self.model, xb, self.extra["proj_seed"])
        if self.kind == "gramstats":
            w = self.whitening
            return (style_statistics(self.model, xb, self.extra["proj_seed"]) - w["mean"]) / w["sd"] @ w["W"]
        return self.model(xb)  # clip: a wrapper returning image features

    def embed_images(self, images) -> np.ndarray:
        """Embed PIL images (squared and resized like a query)."""
        return self.embed(_to_uint8([square_resize(im.convert("RGB"), self.image_size) for im in images]))

    def embed_files(self, paths) -> tuple[np.ndarray, list]:
        """Embed image files, each decoded safely; returns (vectors of the readable ones, [ImageError or None
        per path])."""
        ims, errors = [], []
        for p in paths:
            try:
                ims.append(square_resize(load_rgb(p), self.image_size))
                errors.append(None)
            except ImageError as e:
                errors.append(e)
        return (self.embed(_to_uint8(ims)) if ims else np.zeros((0, self.dim), np.float32)), errors

    # --- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """``encoder.safetensors`` + ``encoder.json``: a trained encoder's weights, or a ``gramstats``
        encoder's whitening (its backbone is the frozen ImageNet one, rebuilt)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.whitening if self.kind == "gramstats" else self.model.state_dict()
        sd = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(folder / "encoder.safetensors") as tmp:
            save_file(sd, str(tmp))
        self.weights_sha256 = hashlib.sha256((folder / "encoder.safetensors").read_bytes()).hexdigest()
        with atomic_path(folder / "encoder.json") as tmp:
            tmp.write_text(json.dumps({**self.describe(), "hidden": self.extra.get("hidden")}, indent=2))
        return folder


def _project(f: torch.Tensor, proj_seed: int, max_channels: int) -> torch.Tensor:
    """Features [N, C, HW] wider than ``max_channels`` through a fixed seeded 1x1 projection."""
    c = f.shape[1]
    if c <= max_channels:
        return f
    g = torch.Generator().manual_seed(proj_seed)
    return (torch.randn(max_channels, c, generator=g).to(f) / c**0.5) @ f


def gram_features(model, x: torch.Tensor, proj_seed: int = 0, max_channels: int = 64) -> torch.Tensor:
    """Upper triangles of the Gram matrices of the backbone's early frozen features (normalised by
    the spatial size). Wider feature maps are first projected to ``max_channels`` by a fixed seeded
    1x1 projection, so the vector stays small (ResNet50's layer2 has 512 channels)."""
    from lorafind_utils.models.classifier import early_features

    f = _project(early_features(model, x).flatten(2), proj_seed, max_channels)  # [N, C, HW]
    c = f.shape[1]
    gram = f @ f.transpose(1, 2) / f.shape[-1]
    iu = torch.triu_indices(c, c)
    return gram[:, iu[0], iu[1]]


def style_statistics(model, x: torch.Tensor, proj_seed: int = 0, max_channels: int = 64) -> torch.Tensor:
    """The ``gramstats`` encoder's raw vector for images ``x`` (float in [0, 1], as :func:`normalize`
    gives): per frozen early stage (:func:`~lorafind_utils.models.classifier.early_stages`) the upper
    triangle of its Gram matrix and its per-channel mean and sd; the pixels' per-channel mean and sd
    and a 64-bin colour histogram; each number under a signed square root (power normalisation).
    Stages wider than ``max_channels`` are first projected by a fixed seeded 1x1 projection."""
    parts = []
    for f in early_stages(model, x):
        f = _project(f.flatten(2), proj_seed, max_channels)  # [N, C, HW]
        c = f.shape[1]
        iu = torch.triu_indices(c, c)
        parts += [(f @ f.transpose(1, 2) / f.shape[-1])[:, iu[0], iu[1]], f.mean(-1), f.std(-1)]
    p = x.float().flatten(2)
    q = (x.float().clamp(0, 0.999) * 4).long()
    code = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
    hist = torch.zeros(len(x), 64).scatter_add_(1, code, torch.ones(code.shape)) / code.shape[1]
    v = torch.cat([*parts, p.mean(-1), p.std(-1), hist.to(p)], 1)
    return v.sign() * v.abs().sqrt()


def fit_gramstats(x: torch.Tensor, backbone: str, weights: str, image_size: int, dim: int = 128,
                  device: str = "cpu", batch_size: int = 128) -> StyleEncoder:
    """A ``gramstats`` encoder fitted to uint8 images ``x`` [N, 3, S, S]: each statistic standardised
    over them, then PCA-whitened to ``dim`` numbers (each component divided by its spread, so no one
    statistic family dominates the cosine). Nothing is trained; the fit is a mean, an sd and a matrix."""
    model = build_model(2, hidden=8, weights=weights, seed=0, backbone=backbone).to(device).eval()
    with torch.no_grad():
        raw = torch.cat([style_statistics(model, normalize(x[i : i + batch_size].to(device), image_size)).cpu()
                         for i in range(0, len(x), batch_size)]).double().numpy()
    mean, sd = raw.mean(0), raw.std(0) + 1e-6
    z = (raw - mean) / sd
    dim = min(dim, len(z) - 1, z.shape[1])
    _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    w = vt[:dim].T / (s[:dim] / np.sqrt(len(z)) + 1e-3)
    whitening = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in (("mean", mean), ("sd", sd),
                                                                                     ("W", w))}
    return _gramstats_encoder(model, whitening, backbone, weights, image_size, device, {"n_fit": int(len(x))})


def _gramstats_encoder(model, whitening: dict, backbone: str, weights: str, image_size: int, device: str,
                       extra: dict, sha: str = "") -> StyleEncoder:
    enc = StyleEncoder("gramstats", model, image_size, backbone, int(whitening["W"].shape[1]), sha, device,
                       {"weights": describe_backbone(backbone, weights), "proj_seed": 0, **extra})
    enc.whitening = {k: v.to(device) for k, v in whitening.items()}
    return enc


def load_gramstats(folder: str | Path, backbone: str, weights: str, image_size: int,
                   device: str = "cpu") -> StyleEncoder:
    """A ``gramstats`` encoder saved by :meth:`StyleEncoder.save` onto this profile's frozen backbone.

    :raises ValueError: missing or damaged files, naming them and how to rebuild.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_p, w_p = folder / "encoder.json", folder / "encoder.safetensors"
    try:
        meta = json.loads(meta_p.read_text())
        whitening = load_file(str(w_p))
        if meta.get("name") != "gramstats" or set(whitening) != {"mean", "sd", "W"}:
            raise ValueError("not a gramstats encoder")
    except FileNotFoundError as e:
        raise ValueError(f"no gramstats style encoder in {folder} ({e.filename} missing); "
                         "rebuild it with `lorafind index build` (stage 08)") from None
    except Exception as e:  # damaged JSON or tensors
        raise ValueError(f"{folder}: the gramstats style encoder cannot be loaded ({type(e).__name__}: {e}); "
                         "rebuild it with `lorafind index build` (stage 08)") from None
    model = build_model(2, hidden=8, weights=weights, seed=0, backbone=backbone)
    sha = hashlib.sha256(w_p.read_bytes()).hexdigest()
    extra = {k: v for k, v in meta.items()
             if k not in ("name", "backbone", "dim", "image_size", "sha256", "weights", "proj_seed", "hidden")}
    return _gramstats_encoder(model, whitening, backbone, weights, image_size, device, extra, sha)


def _head_model(backbone: str, weights: str, embed_dim: int, hidden: int, seed: int):
    """A stage-02-shaped network whose head outputs ``embed_dim`` numbers (the embedding)."""
    return build_model(embed_dim, hidden=hidden, weights=weights, seed=seed, backbone=backbone)


def training_free(kind: str, backbone: str, weights: str, image_size: int, device: str = "cpu") -> StyleEncoder:
    """The ``imagenet`` or ``gram`` baseline on the frozen backbone (nothing is trained)."""
    model = build_model(2, hidden=8, weights=weights, seed=0, backbone=backbone)
    if kind == "imagenet":
        dim = int(model.fc[0].in_features)
        return StyleEncoder("imagenet", model, image_size, backbone, dim, device=device,
                            extra={"weights": describe_backbone(backbone, weights)})
    if kind == "gram":
        with torch.no_grad():
            dim = int(gram_features(model.eval(), torch.zeros(1, 3, image_size, image_size)).shape[1])
        return StyleEncoder("gram", model, image_size, backbone, dim, device=device,
                            extra={"weights": describe_backbone(backbone, weights), "proj_seed": 0})
    raise ValueError(f"unknown training-free encoder '{kind}' (imagenet | gram)")


def clip_encoder(model_id: str, image_size: int = 224, device: str = "cpu") -> StyleEncoder:
    """A CLIP image encoder (hub id or local folder) as a style encoder (``clip:<id>``)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(model_id).eval()
    mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
    size = int(clip.config.vision_config.image_size)

    class _Image(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip

        def forward(self, x):
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out = self.clip.get_image_features(pixel_values=(x - mean.to(x)) / std.to(x))
            return out if torch.is_tensor(out) else out.pooler_output

    dim = int(clip.config.projection_dim)
    return StyleEncoder(f"clip:{model_id}", _Image(), image_size, "clip", dim, device=device)


def train_encoder(
    data,
    train_ids: list[str],
    backbone: str,
    weights: str,
    image_size: int,
    embed_dim: int = 128,
    hidden: int = 512,
    epochs: int = 8,
    lr: float = 1e-3,
    bases_per_batch: int = 4,
    temperature: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[StyleEncoder, list]:
    """Train the ``trained`` encoder with a supervised-contrastive loss on restyled images.

    :param data: an :class:`~lorafind_utils.models.classifier.ImageSet` (stage 01's images, labels = LoRA).
    :param train_ids: the base images to train on (stage 02's training split: validation base images
        and every query stay unseen).
    :param bases_per_batch: base images per step; each comes under every LoRA (labels = LoRAs).
    :return: (encoder, history [{epoch, loss, seconds}]).
    """
    from pytorch_metric_learning.losses import SupConLoss
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _head_model(backbone, weights, embed_dim, hidden, seed).to(device).to(memory_format=torch.channels_last)
    set_trainable(model, "finetune")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    by_base: dict[str, list[int]] = {}
    for i, b in enumerate(data.groups):
        by_base.setdefault(b, []).append(i)
    ids = [b for b in sorted(set(train_ids)) if b in by_base]
    if len(ids) < 2:
        raise ValueError(f"the style encoder needs at least 2 training base images, got {len(ids)}")
    steps = max(1, len(ids) // max(1, bases_per_batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    loss_fn = SupConLoss(temperature=temperature)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=epochs * steps, desc="style encoder", unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
        train_mode(model)
        total = 0.0
        for s in range(steps):
            rows = [r for b in order[s * bases_per_batch : (s + 1) * bases_per_batch] for r in by_base[b]]
            xb = normalize(augment_batch(data.x[rows], g).to(device))
            z = F.normalize(model(xb), dim=1)
            loss = loss_fn(z, data.y[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.update()
        history.append({"epoch": epoch, "loss": total / steps, "seconds": round(time.perf_counter() - t0, 2)})
        bar.set_postfix(loss=f"{total / steps:.3f}")
    bar.close()
    model.eval()
    enc = StyleEncoder("trained", model, image_size, backbone, embed_dim, device=device,
                       extra={"weights": describe_backbone(backbone, weights), "hidden": hidden,
                              "loss": f"SupConLoss(temperature={temperature})", "epochs": epochs, "seed": seed})
    return enc, history


def load_trained(folder: str | Path, device: str = "cpu") -> StyleEncoder:
    """A trained encoder saved by :meth:`StyleEncoder.save`.

    :raises ValueError: missing or damaged files, naming them and how to rebuild.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_p, w_p = folder / "encoder.json", folder / "encoder.safetensors"
    rebuild = "rebuild it with `lorafind index build` (stage 08)"
    try:
        meta = json.loads(meta_p.read_text())
        model = _head_model(meta["backbone"], "none", int(meta["dim"]), int(meta.get("hidden") or 512), 0)
        model.load_state_dict(load_file(str(w_p)))
    except FileNotFoundError as e:
        raise ValueError(f"no trained style encoder in {folder} ({e.filename} missing); {rebuild}") from None
    except Exception as e:  # damaged JSON or weights
        raise ValueError(
            f"{folder}: the trained style encoder cannot be loaded ({type(e).__name__}: {e}); {rebuild}"
        ) from None
    sha = hashlib.sha256(w_p.read_bytes()).hexdigest()
    extra = {k: v for k, v in meta.items() if k not in ("name", "backbone", "dim", "image_size", "sha256")}
    return StyleEncoder(
        "trained", model, int(meta["image_size"]), meta["backbone"], int(meta["dim"]), sha, device, extra
    )
