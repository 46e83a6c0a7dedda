"""The JupyterLab panel driven from Python: uploads set as ipywidgets does, rankings and messages checked."""
import datetime
import io

import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image

from lorafind_utils.app.widget import SAMPLE_SIZE, RankWidget
from lorafind_utils.app.widget import _png as widget_png
from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, load_profile, stage_params
from lorafind_utils.core.images import load_rgb
from lorafind_utils.models.classifier import build_model, save_checkpoint
from lorafind_utils.rank import index_ops as indexing
from lorafind_utils.rank.classifier_ranker import Ranker
from lorafind_utils.rank.style_index import StyleIndex

#: stage 01 on 3 base images (the samples), stage 08 with the training-free encoder (fast)
FAST = {"01_synthesize": {"sets": ["variety"], "max_images": 3}, "02_finetune": {"val_fraction": 0.34},
        "08_index": {"encoder": "imagenet"}}


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


def _classifier(c, runs):
    slugs = [e["slug"] for e in load_catalog(c)]
    m = build_model(len(slugs), hidden=32, weights="none", backbone="efficientnet_lite0", seed=5)
    save_checkpoint(m, slugs, runs / "train" / "finetune_variety", {"hidden": 32, "image_size": 32})
    (runs / "train" / "finetune_variety" / "metrics.json").write_text("{}")  # a finished run


@pytest.fixture(scope="module")
def cfg(tiny_root, tiny_pipe, tmp_path_factory):
    """A trained classifier (random weights) and stage 01's images of 3 base images per LoRA."""
    from lorafind_utils.stages.synthesis import synthesize

    runs = tmp_path_factory.mktemp("widget_runs")
    c = load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(runs), "stages": FAST})
    _classifier(c, runs)
    synthesize(c, stage_params(c, "01_synthesize"), pipe=tiny_pipe, progress=False)
    return c


@pytest.fixture(scope="module")
def index_folder(cfg):
    """The profile's style index (stage 08), built over those images."""
    return indexing.build(cfg, progress=False, log=lambda *a: None)["folder"]


def _set_calibration(folder, intercept: float) -> None:
    """P(match) = sigmoid(intercept) for every query: below the 0.5 threshold or above it."""
    with indexing.index_lock(folder):
        ix = StyleIndex.load(folder)
        ix.params["calibration"] = {**ix.params["calibration"], "coef": [0.0, 0.0], "intercept": intercept}
        ix.save(folder)


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
    import tempfile
    from pathlib import Path

    from test_retrieval import _huge_png

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


def _shown_pngs(box) -> list[bytes]:
    """The PNG images a row's samples widget shows (data URIs)."""
    import base64
    import re

    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', box.value)]


def _titles(box) -> list[str]:
    import html
    import re

    return [html.unescape(t) for t in re.findall(r'title="([^"]*)"', box.value)]


def _stage01_paths(cfg, slug):
    synth = layout.synth_dir(cfg)
    return [layout.synth_image(synth, "variety", slug, i) for i in layout.read_synth_manifest(synth)["sets"]["variety"]]


def test_each_ranked_lora_shows_a_few_of_its_own_stage01_images(cfg, monkeypatch):
    from lorafind_utils.core import images

    reads = []
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    w = RankWidget(cfg, top=4)
    w.upload.value = _upload(_png())
    slugs = w.ranking.slugs
    for slug, row in zip(slugs, w.results.children):
        box = row.children[4]
        paths = _stage01_paths(cfg, slug)  # the 3 base images stage 01 restyled, the same in every row
        assert "lorafind-samples" in box._dom_classes and _shown_pngs(box) == [widget_png(load_rgb(p), SAMPLE_SIZE)
                                                                             for p in paths]
        assert _titles(box) == [f"{slug}: stage 01, variety/{p.stem}" for p in paths]
        assert w.lora_samples(slug).sources == paths
    first, second = (_shown_pngs(row.children[4])[0] for row in w.results.children[:2])
    assert first != second  # each row its own LoRA's restyle of the same photo
    assert len(reads) == 4 * 3
    w.top.value = 7  # the shown rows are cached: only the 3 new LoRAs' images are read
    assert len(reads) == 7 * 3 and all(len(_shown_pngs(r.children[4])) == 3 for r in w.results.children)
    w.top.value = 2
    w.upload.value = _upload(_png((10, 200, 40)), "other.png")
    assert len({str(r) for r in reads}) == len(reads)  # a new upload reads no file twice


def test_without_stage01_each_row_says_no_images_stored(tiny_root, tmp_path):
    c = load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(tmp_path)})
    _classifier(c, tmp_path)
    w = RankWidget(c, top=3)
    w.upload.value = _upload(_png())
    assert len(w.results.children) == 3 and "#b00020" not in w.status.value
    for row in w.results.children:
        box = row.children[4]
        assert "lorafind-no-samples" in box._dom_classes
        assert "no images stored" in box.value and "run stage 01" in box.value


def test_style_index_says_none_of_these_with_the_closest_lora_only_when_it_applies(cfg, index_folder):
    w = RankWidget(cfg, top=5, method="index")
    data = _png((30, 160, 220))
    _set_calibration(index_folder, -30.0)  # P(match) ~ 1e-13: below the threshold
    w.upload.value = _upload(data, "mine.png")
    expected = indexing.IndexRanker.from_profile(cfg).rank([Image.open(io.BytesIO(data))])[0]
    assert w.ranking.method == "index" and w.ranking.match is False and w.ranking.match_p < 0.5
    msg = w.none_of_these.value
    assert w.none_of_these.layout.display != "none"
    assert "None of these LoRAs paints this style (P(match) = &lt; 1 %); closest: " + expected.names[0] in msg
    assert _names_shown(w) == expected.names[:5]  # the ranking is still listed below it
    assert all(len(_shown_pngs(r.children[4])) == 3 for r in w.results.children)  # catalog LoRAs: stage-01 images
    assert "mine.png: LoRAs ranked by the style index" in w.status.value and "Traceback" not in w.status.value
    # the classifier has no "none of these": switching hides the message
    w.method.value = "classifier"
    assert w.ranking.method == "classifier" and w.none_of_these.value == "" and w.none_of_these.layout.display == "none"
    # the same index calibrated so that P(match) is above the threshold: no message (re-read, no restart)
    _set_calibration(index_folder, 30.0)
    w.method.value = "index"
    assert w.ranking.match is True and w.none_of_these.value == "" and w.none_of_these.layout.display == "none"
    assert _names_shown(w) == expected.names[:5]
    _set_calibration(index_folder, float(np.log(0.42 / 0.58)))  # P = 42 %: shown as a percentage
    w.method.value = "classifier"
    w.method.value = "index"
    assert "(P(match) = 42 %); closest: " in w.none_of_these.value


def test_an_entry_added_from_previews_says_the_index_stores_no_images(cfg, index_folder, tmp_path):
    previews = tmp_path / "previews"
    previews.mkdir()
    for i, color in enumerate([(250, 250, 20), (240, 230, 40)]):
        (previews / f"p{i}.png").write_bytes(_png(color, 64))
    indexing.add_thumbnails(cfg, previews, "previews_only", log=lambda *a: None)
    try:
        w = RankWidget(cfg, top=12, method="index")
        w.upload.value = _upload((previews / "p0.png").read_bytes(), "p0.png")
        assert "previews_only" in w.ranking.slugs[:12]
        for slug, row in zip(w.ranking.slugs, w.results.children):
            box = row.children[4]
            if slug == "previews_only":
                assert "lorafind-no-samples" in box._dom_classes and "no images stored" in box.value
                assert "2 preview images" in box.value and "embedding" in box.value
            else:
                assert len(_shown_pngs(box)) == 3
    finally:
        indexing.remove(cfg, "previews_only", log=lambda *a: None)
