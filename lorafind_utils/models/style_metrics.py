"""Image-set metrics for a trained style LoRA: FID, KID, LPIPS, CLIP score, Inception score.

The implementations are the standard ones: torchmetrics' ``FrechetInceptionDistance``,
``KernelInceptionDistance`` and ``InceptionScore``, the ``lpips`` package, and the CLIP score of
Hessel et al. (100 · max(cos(image, text), 0), as torchmetrics defines it) computed with a
transformers ``CLIPModel``. Their networks are a parameter (``feature_net``):

* ``inception`` -- the standard FID Inception-v3 (torchmetrics downloads it; needs access);
* ``efficientnet_lite0`` -- offline: the ImageNet-pretrained EfficientNet-Lite0 from its PyPI
  wheel, injected through torchmetrics' own ``feature=`` hook (pooled 1280-d features for
  FID/KID, 1000 ImageNet logits for IS). Values are then *not* comparable with published
  Inception numbers, only with each other; every output names the network used.

LPIPS uses AlexNet with the package's calibrated linear layers (shipped in its wheel); offline,
the AlexNet backbone's ImageNet weights are unavailable and ``lpips_backbone="random"`` uses a
random one (``pnet_rand=True``), said in the outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights from its wheel) as a torchmetrics feature extractor.

    Input: uint8 [N, 3, H, W] (as torchmetrics passes it) or float in [0, 1]; resized to 224.
    ``logits=False``: pooled 1280-d features; ``logits=True``: the 1000 ImageNet logits.
    """

    def __init__(self, logits: bool = False):
        super().__init__()
        from lorafind_utils.models.classifier import efficientnet_lite0_net

        self.net = efficientnet_lite0_net("imagenet").eval().requires_grad_(False)
        self.logits = logits
        self.num_features = 1000 if logits else 1280

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != 224:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 0.5) / 0.5
        if self.logits:
            return self.net(x).double()
        return self.net.extract_features(x).mean((2, 3)).double()


def feature_extractor(feature_net: str = "efficientnet_lite0", logits: bool = False):
    """The ``feature=`` argument for torchmetrics: an int/str (standard Inception) or our module."""
    if feature_net == "inception":
        return "logits_unbiased" if logits else 2048
    if feature_net == "efficientnet_lite0":
        return EfficientNetFeatures(logits=logits)
    raise ValueError(f"unknown feature network '{feature_net}' (inception | efficientnet_lite0)")


class FidKid:
    """FID and KID of generated sets against one fixed real set, whose features are computed
    once (torchmetrics' ``reset_real_features=False``) however many sets are scored.

    KID's random subsets are drawn from a seeded generator state, so a rerun gives the same value.
    """

    def __init__(self, real: torch.Tensor, feature=None, subset_size: int = 50, seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        feature = feature if feature is not None else feature_extractor()
        self.n_real, self.subset_size, self.seed = len(real), subset_size, seed
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=feature, subset_size=subset_size, subsets=50, reset_real_features=False
        )
        for m in (self.fid, self.kid):
            m.update(real, real=True)

    def __call__(self, fake: torch.Tensor) -> dict:
        n = min(self.n_real, len(fake))
        if n < 2:
            raise ValueError("FID/KID need at least 2 images in each set")
        self.kid.subset_size = min(self.subset_size, n)
        for m in (self.fid, self.kid):
            m.reset()  # the generated set only: the real features are kept
            m.update(fake, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            k_mean, k_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(k_mean), "kid_sd": float(k_std)}


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature=None, subset_size: int = 50, seed: int = 0) -> dict:
    """FID and KID (mean, sd over subsets) between two uint8 image sets [N, 3, H, W]."""
    if min(len(real), len(fake)) < 2:
        raise ValueError("FID/KID need at least 2 images in each set")
    return FidKid(real, feature, subset_size, seed)(fake)


def inception_score(images: torch.Tensor, feature=None, splits: int = 1) -> dict:
    """Inception score (mean, sd over splits) of a uint8 image set."""
    from torchmetrics.image.inception import InceptionScore

    m = InceptionScore(feature=feature if feature is not None else feature_extractor(logits=True), splits=splits)
    m.update(images)
    mean, std = m.compute()
    return {"is": float(mean), "is_sd": float(std) if splits > 1 else float("nan")}


def lpips_model(backbone: str = "random", seed: int = 0):
    """``lpips.LPIPS`` (AlexNet): ``backbone="imagenet"`` (torchvision download) or ``"random"``
    (offline; initialised from ``seed``, so the same network every run)."""
    import lpips

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=(backbone == "random"), verbose=False).eval()


@torch.no_grad()
def lpips_to_set(fake: torch.Tensor, real: torch.Tensor, model) -> float:
    """Mean LPIPS over all (generated, style image) pairs; uint8 inputs of equal size."""
    a = fake.float().div(127.5).sub(1)
    b = real.float().div(127.5).sub(1)
    d = [model(a[i : i + 1].expand(len(b), -1, -1, -1), b).flatten() for i in range(len(a))]
    return float(torch.cat(d).mean())


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model, processor) -> float:
    """CLIP score (Hessel et al., as torchmetrics): mean of 100 · max(cos(image, text), 0)."""
    from PIL import Image

    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    inp = processor(text=prompts, images=pil, return_tensors="pt", padding="max_length", truncation=True)
    img = model.get_image_features(pixel_values=inp["pixel_values"])
    txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp.get("attention_mask"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = F.cosine_similarity(img, txt, dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def load_clip(path: str):
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` from a hub id or local folder."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
