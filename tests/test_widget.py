"""The JupyterLab panel driven from Python: uploads set as ipywidgets does, rankings and messages checked."""
import io
import datetime

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from lorafind_utils.classifier import build_model, save_checkpoint
from lorafind_utils.config import load_catalog, load_profile
from lorafind_utils.retrieval import Ranker
from lorafind_utils.widget import RankWidget


def _upload(data: bytes, name: str = "q.png", size: int | None = None):
    """A FileUpload value as ipywidgets 8 sets it: a tuple of dicts with a memoryview."""
    return ({"name": name, "type": "image/png", "size": len(data) if size is None else size,
             "content": memoryview(data), "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def _png(color=(200, 30, 30), size=48) -> bytes:
    rng = np.random.default_rng(sum(color))
    a = (rng.integers(0, 60, (size, size, 3)) + np.array(color)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cfg(tiny_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("widget_runs")
    c = load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(runs)})
    slugs = [e["slug"] for e in load_catalog(c)]
    m = build_model(len(slugs), hidden=32, weights="none", backbone="efficientnet_lite0", seed=5)
    save_checkpoint(m, slugs, runs / "train" / "finetune_variety", {"hidden": 32, "image_size": 32})
    (runs / "train" / "finetune_variety" / "metrics.json").write_text("{}")  # a finished run
    return c


def _names_shown(w):
    return [row.children[1].value for row in w.results.children]


def test_upload_shows_the_ranking_with_score_bars(cfg):
    w = RankWidget(cfg, top=4)
    data = _png()
    w.upload.value = _upload(data)
    expected = Ranker.from_profile(cfg).rank([Image.open(io.BytesIO(data))])[0]
    assert _names_shown(w) == expected.names[:4]
    bars = [row.children[2].value for row in w.results.children]
    assert bars == pytest.approx(expected.scores[:4], abs=1e-6) and bars == sorted(bars, reverse=True)
    assert "ranked" in w.status.value and "#b00020" not in w.status.value
    assert w.lora.value == expected.slugs[0] and not w.generate_button.disabled
    w.top.value = 7
    assert len(w.results.children) == 7


@pytest.mark.parametrize("data,name,size,message", [
    (b"", "empty.png", None, "empty file"),
    (b"this is text, not pixels", "notes.png", None, "not a readable image"),
    (b"x" * (51 * 2**20), "huge.png", None, "too large"),  # the bytes received count, not a declared size
])
def test_bad_uploads_are_short_messages(cfg, data, name, size, message):
    w = RankWidget(cfg)
    w.upload.value = _upload(data, name, size)
    assert message in w.status.value and name in w.status.value and "#b00020" in w.status.value
    assert "Traceback" not in w.status.value and w.results.children == () and w.generate_button.disabled


def test_huge_image_dimensions_are_refused(cfg):
    from test_retrieval import _huge_png

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        _huge_png(Path(d) / "bomb.png")
        data = (Path(d) / "bomb.png").read_bytes()
    w = RankWidget(cfg)
    w.upload.value = _upload(data, "bomb.png")
    assert "too large to decode safely" in w.status.value


def test_no_classifier_yet_says_which_stage_to_run(tiny_root, tmp_path):
    w = RankWidget(load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(tmp_path)}))
    w.upload.value = _upload(_png())
    assert "run stage 02" in w.status.value and "lorafind train" in w.status.value


def test_generate_restyles_the_base_and_shows_it_beside_the_query(cfg, catalog):
    w = RankWidget(cfg)
    w.upload.value = _upload(_png((20, 90, 200)))
    w.lora.value = "cloudy"
    w.generate_button.click()
    assert "Done" in w.status.value, w.status.value
    labels = [box.children[1].value for box in w.generated.children]
    assert labels[0] == "query" and labels[1].startswith("base ") and labels[2].startswith("Cloudy — style sim. ")
    first = np.asarray(w.last_generated, dtype=np.int16)
    w.lora.value = "disco"
    w.generate_button.click()
    assert np.abs(first - np.asarray(w.last_generated, dtype=np.int16)).mean() > 1  # the chosen LoRA matters
    assert w.progress.value == w.progress.max and w.progress.layout.visibility == "hidden"
    # an unreadable uploaded base image is a message, not a traceback
    w.base_upload.value = _upload(b"garbage", "base.jpg")
    w.generate_button.click()
    assert "base.jpg" in w.status.value and "not a readable image" in w.status.value
