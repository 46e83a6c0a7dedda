"""Stage 08: the style-embedding index -- entries, adding a LoRA without retraining, "none of these"."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides
from PIL import Image

from lorafind_utils.app.cli import main
from lorafind_utils.core import layout
from lorafind_utils.core.config import load_profile
from lorafind_utils.models.loras import LoraError
from lorafind_utils.rank import index_ops as indexing
from lorafind_utils.rank.style_index import IndexEntryExists, IndexFileError, StyleIndex

FAST = {"08_index": {"encoder": "imagenet", "compare": ["imagenet"], "epochs": 1, "seeds": [0], "folds": 0,
                     "add_images": 3, "open_set_images": 2, "latency_queries": 2}}


@pytest.fixture(scope="module")
def world(tiny_root, catalog, tmp_path_factory):
    """Stage 01 on 6 base images with the tiny models, and the profile's index built over it."""
    from lorafind_utils.stages.synthesis import synthesize

    root = tmp_path_factory.mktemp("index")
    cfg = load_profile(
        "standin",
        {
            **tiny_overrides(tiny_root),
            "runs_dir": str(root / "runs"),
            "figures_dir": str(root / "fig"),
            "stages": {
                **FAST,
                "01_synthesize": {"sets": ["variety"], "max_images": 6},
                "02_finetune": {"val_fraction": 0.34},
            },
        },
    )
    from lorafind_utils.core.config import stage_params

    synthesize(cfg, stage_params(cfg, "01_synthesize"), progress=False, workers=1)
    built = indexing.build(cfg, progress=False, log=lambda *a: None)
    prof = root / "p.yaml"
    prof.write_text(yaml.safe_dump(cfg))
    return cfg, built, prof


def test_each_lora_entry_is_the_normalised_mean_of_its_images(world):
    cfg, built, _ = world
    enc, index = built["encoder"], built["index"]
    sd = indexing.load_style_data(cfg)
    k = sd.classes.index("pixel_art")
    rows = [i for i, (y, g) in enumerate(zip(sd.data.y.tolist(), sd.data.groups)) if y == k and g in set(sd.train_ids)]
    v = enc.embed(sd.data.x[rows]).mean(0)
    np.testing.assert_allclose(index.entry("pixel_art").vector, v / np.linalg.norm(v), atol=1e-5)
    assert index.entry("pixel_art").meta["n_images"] == len(rows) and len(index) == len(sd.classes)


def test_a_lora_is_found_by_its_own_images_and_the_index_reloads_after_an_add(world, catalog, tmp_path):
    cfg, built, prof = world
    ranker = indexing.IndexRanker.from_profile(cfg)
    synth = layout.synth_dir(cfg)
    img = layout.synth_image(synth, "variety", "cloudy", layout.read_synth_manifest(synth)["sets"]["variety"][0])
    r = ranker.rank_files([img])[0]
    assert r.method == "index" and r.slugs[0] == "cloudy" and r.match is not None
    before = (built["folder"] / "index.json").read_bytes()
    # add a LoRA the index does not have yet (a catalog file under a new name): restyle, embed, add -- no training
    add = indexing.add_lora(cfg, next(e["path"] for e in catalog if e["slug"] == "disco"), name="disco_again",
                            progress=False, log=lambda *a: None)
    assert add["images"] == 3 and add["entries"] == len(catalog) + 1
    assert "disco_again" in ranker.slugs  # the same ranker object sees it: re-read on change, no restart
    # a name that exists asks for --replace
    with pytest.raises(IndexEntryExists, match="--replace"):
        indexing.add_lora(cfg, next(e["path"] for e in catalog if e["slug"] == "disco"), name="disco_again",
                          progress=False, log=lambda *a: None)
    # `index add` restyles exactly as stage 01 does: re-adding disco under its own name (same seeds) gives the
    # entry of stage 01's images of those base images
    indexing.add_lora(cfg, next(e["path"] for e in catalog if e["slug"] == "disco"), name="disco", replace=True,
                      progress=False, log=lambda *a: None)
    ix = StyleIndex.load(built["folder"])
    ids = layout.read_synth_manifest(synth)["sets"]["variety"][:3]
    x = torch.stack(
        [
            torch.from_numpy(
                np.array(Image.open(layout.synth_image(synth, "variety", "disco", i)).convert("RGB"))
            ).permute(2, 0, 1)
            for i in ids
        ]
    )
    z, _ = indexing.lora_embeddings(built["encoder"], x, "prototype")
    want, self_sim = indexing.entry_vector(z, "prototype"), indexing.self_similarity(z, "prototype")
    assert float(ix.entry("disco").vector @ want) > 0.995 and ix.entry("disco").meta["n_images"] == 3
    # the spread score's scale: each image against the entry of the others (measured: mean 0.66, sd 0.06)
    mu, sd = ix.entry("disco").meta["self_sim"]
    assert abs(mu - self_sim[0]) < 0.01 and 0.5 < mu <= 1.0 and 0.0 <= sd < 0.5
    indexing.remove(cfg, "disco_again", log=lambda *a: None)
    assert (built["folder"] / "index.json").read_bytes() != before and "disco_again" not in ranker.slugs


def test_a_refused_lora_leaves_the_index_unchanged_with_lora_checks_message(world, tmp_path, capsys):
    cfg, built, prof = world
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}, str(sdxl))
    pickle = tmp_path / "evil.ckpt"
    torch.save({"a": 1}, pickle)
    before = (built["folder"] / "index.json").read_bytes()
    for f in (sdxl, pickle):
        assert main(["lora", "check", str(f), "--profile", str(prof)]) == 2
        check_msg = capsys.readouterr().err
        assert main(["index", "add", str(f), "--profile", str(prof)]) == 2
        assert capsys.readouterr().err == check_msg  # the same message as `lora check`
        with pytest.raises(LoraError):
            indexing.add_lora(cfg, f, progress=False)
    assert (built["folder"] / "index.json").read_bytes() == before


def test_a_crash_mid_add_keeps_the_previous_index(world, catalog, monkeypatch):
    cfg, built, _ = world
    before = {p.name: p.read_bytes() for p in built["folder"].iterdir()}

    def boom(*a, **k):
        raise RuntimeError("killed while restyling")

    monkeypatch.setattr("lorafind_utils.models.restyle.restyle", boom)
    with pytest.raises(RuntimeError):
        indexing.add_lora(cfg, catalog[0]["path"], name="half_added", progress=False, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in built["folder"].iterdir()} == before


def test_thumbnail_only_entries_and_none_of_these(world, tmp_path):
    cfg, built, prof = world
    synth = layout.synth_dir(cfg)
    ids = layout.read_synth_manifest(synth)["sets"]["variety"]
    thumbs = tmp_path / "previews"
    thumbs.mkdir()
    for i in ids[:3]:
        shutil.copy(layout.synth_image(synth, "variety", "pop_art", i), thumbs / f"{i}.png")
    (thumbs / "broken.png").write_bytes(b"\x89PNG garbage")
    out = indexing.add_thumbnails(cfg, thumbs, "pop_art_previews", log=lambda *a: None)
    assert out["images"] == 3 and len(out["skipped"]) == 1 and "broken.png" in out["skipped"][0]
    ix = StyleIndex.load(built["folder"])
    assert ix.entry("pop_art_previews").meta["source"] == "thumbnails"
    indexing.remove(cfg, "pop_art_previews", log=lambda *a: None)
    # calibrated: P(match) is higher for a catalogued style than for a flat grey square no LoRA paints
    ranker = indexing.IndexRanker.from_profile(cfg)
    grey = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    r_known, r_grey = ranker.rank_files([layout.synth_image(synth, "variety", "pop_art", ids[0]), grey])
    assert r_known.match_p > r_grey.match_p
    cal = ix.params["calibration"]
    assert cal["validation"]["queries"] > 0 and set(cal["candidates"]) == {"cosine", "csls", "spread"}
    assert cal["validation"]["auroc"] == max(c["auroc"] for c in cal["candidates"].values())


def test_rank_json_carries_match_and_index_errors_are_clear(world, tmp_path, capsys):
    cfg, built, prof = world
    synth = layout.synth_dir(cfg)
    img = layout.synth_image(synth, "variety", "liuli", layout.read_synth_manifest(synth)["sets"]["variety"][0])
    assert main(["rank", str(img), "--profile", str(prof), "--method", "index", "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    assert out["method"] == "index" and isinstance(out["match"], bool) and len(out["ranking"]) == 3
    # --top K asks faiss for the K best (at least the 10 P(match) reads): the head and P(match) of the whole ranking
    full = indexing.IndexRanker.from_profile(cfg).rank_files([img])[0]
    assert [r["lora"] for r in out["ranking"]] == full.slugs[:3] and len(full.slugs) > 3
    assert out["match_probability"] == pytest.approx(full.match_p, abs=1e-4)
    one = indexing.IndexRanker(cfg, built["encoder"], built["folder"], top_k=1).rank_files([img])[0]
    assert one.slugs == full.slugs[:1] and one.match_p == pytest.approx(full.match_p, abs=1e-6)
    # an index built with another encoder, or a damaged one: named, with how to rebuild
    with pytest.raises(IndexFileError, match=r"index built with encoder .*rebuild"):
        StyleIndex.load(built["folder"], expect_encoder={**built["encoder"].describe(), "name": "gram"}, profile="tiny")
    broken = tmp_path / "broken_index"
    shutil.copytree(built["folder"], broken)
    (broken / "index.faiss").write_bytes((broken / "index.faiss").read_bytes()[:50])
    with pytest.raises(IndexFileError, match=r"index\.faiss"):
        StyleIndex.load(broken)


def test_the_trained_encoder_learns_and_reloads_identically(world, tmp_path):
    cfg, _, _ = world
    from lorafind_utils.models.style_encoder import load_trained

    sd = indexing.load_style_data(cfg)
    enc = indexing.make_encoder(cfg, "trained", sd, seed=0, folder=tmp_path / "enc", progress=False)
    hist = enc.extra["history"]
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    again = load_trained(tmp_path / "enc")
    x = sd.data.x[:5]
    np.testing.assert_allclose(enc.embed(x), again.embed(x), atol=1e-6)
    assert again.describe()["sha256"] == enc.describe()["sha256"] != ""
