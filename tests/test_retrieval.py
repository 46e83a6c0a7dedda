"""Stage 05/06: ranking, Table 3 metrics, style similarity, the rank and generate commands."""
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lorafind_utils.app.cli import main
from lorafind_utils.core.config import load_catalog, load_profile
from lorafind_utils.core.images import ImageError
from lorafind_utils.models.classifier import build_model, save_checkpoint
from lorafind_utils.rank.classifier_ranker import Ranker, Ranking, retrieval_metrics
from lorafind_utils.stages.retrieval import Query, evaluate_queries, table3, write_table3


@pytest.fixture(scope="module")
def ranker_env(tmp_path_factory):
    """A saved classifier (random weights) where stage 02 puts it, and a profile YAML pointing there."""
    root = tmp_path_factory.mktemp("rank")
    cfg = load_profile("standin", {"runs_dir": str(root / "runs"), "figures_dir": str(root / "fig")})
    slugs = [e["slug"] for e in load_catalog(cfg)]
    m = build_model(len(slugs), hidden=32, weights="none", backbone="efficientnet_lite0", seed=3)
    save_checkpoint(m, slugs, root / "runs" / "train" / "finetune_variety", {"hidden": 32, "image_size": 32})
    (root / "runs" / "train" / "finetune_variety" / "metrics.json").write_text("{}")  # a finished run
    prof = root / "profile.yaml"
    prof.write_text(yaml.safe_dump(cfg))
    return cfg, prof, root


def _huge_png(path, w=40000, h=40000):
    """A valid PNG header claiming w x h pixels (a decompression bomb, a few bytes on disk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    )


def _formats(d):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    files = {}
    rgb.convert("CMYK").save(files.setdefault("cmyk", d / "cmyk.jpg"))
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(files.setdefault("png16", d / "g16.png"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files.setdefault("rgba", d / "rgba.png"))
    rgb.convert("P").save(files.setdefault("gif", d / "a.gif"))
    rgb.save(files.setdefault("webp", d / "a.webp"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rgb.save(files.setdefault("exif", d / "rot.jpg"), exif=exif)
    return files


def test_ranking_is_a_permutation_of_the_catalog_with_scores_summing_to_one(ranker_env, tmp_path):
    cfg, _, _ = ranker_env
    ranker = Ranker.from_profile(cfg)
    files = _formats(tmp_path)
    rankings = ranker.rank(list(files.values()))
    assert len(rankings) == len(files)
    for r in rankings:
        assert sorted(r.slugs) == sorted(ranker.slugs) and len(set(r.slugs)) == 12
        assert sum(r.scores) == pytest.approx(1.0, abs=1e-6)
        assert r.scores == sorted(r.scores, reverse=True)
    # one query alone ranks exactly as inside a batch (model loaded once, eval mode)
    alone = ranker.rank([files["webp"]])[0]
    assert alone.slugs == rankings[4].slugs and alone.scores == pytest.approx(rankings[4].scores, abs=1e-6)
    # EXIF rotation is applied: orientation 6 means "rotate 90° clockwise to display"
    from lorafind_utils.core.images import square_resize

    stored = Image.open(files["exif"]).convert("RGB")  # the pixels as stored, unrotated
    upright = torch.from_numpy(
        np.asarray(square_resize(stored.transpose(Image.Transpose.ROTATE_270), 32)).copy()
    ).permute(2, 0, 1)
    as_stored = torch.from_numpy(np.asarray(square_resize(stored, 32)).copy()).permute(2, 0, 1)
    got = ranker.preprocess(files["exif"])
    assert torch.equal(got, upright) and not torch.equal(got, as_stored)


def test_bad_query_images_get_clear_errors(ranker_env, tmp_path):
    cfg, prof, _ = ranker_env
    ranker = Ranker.from_profile(cfg)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    good = tmp_path / "ok.png"
    Image.new("RGB", (50, 50), (200, 10, 10)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    _huge_png(tmp_path / "bomb.png")
    for name, msg in [
        ("empty.png", "empty file"),
        ("notes.jpg", "not a readable image"),
        ("cut.png", "not a readable image"),
        ("bomb.png", "too large to decode safely"),
    ]:
        with pytest.raises(ImageError, match=msg):
            ranker.rank([tmp_path / name])
    r = subprocess.run([sys.executable, "-m", "lorafind_utils.app.cli", "rank", str(good), str(tmp_path / "bomb.png"),
                        "--profile", str(prof), "--top", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bomb.png" in r.stderr and "too large" in r.stderr
    assert "ok.png" in r.stdout and r.stdout.count("%") == 3  # the good image was still ranked


def test_rank_cli_json(ranker_env, tmp_path, capsys):
    _, prof, _ = ranker_env
    img = tmp_path / "q.png"
    Image.new("RGB", (64, 64), (20, 200, 90)).save(img)
    assert main(["rank", str(img), "--profile", str(prof), "--json", "--top", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1 and [x["rank"] for x in out[0]["ranking"]] == [1, 2, 3, 4]
    assert main(["rank", str(img), "--profile", str(prof), "--run", "nope"]) == 2
    assert "run stage 02 first" in capsys.readouterr().err


def test_retrieval_metrics_match_a_hand_computed_case():
    m = retrieval_metrics([1, 6, 1, 2, 4, 1], n_loras=12)
    assert m["top1"] == pytest.approx(3 / 6) and m["top3"] == pytest.approx(4 / 6) and m["top6"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 6 + 1 + 1 / 2 + 1 / 4 + 1) / 6)
    assert m["median_rank"] == 1.5 and m["chance_top1"] == pytest.approx(1 / 12)
    assert m["chance_mrr"] == pytest.approx(sum(1 / k for k in range(1, 13)) / 12)
    with pytest.raises(ValueError):
        retrieval_metrics([])


def test_table3_marks_the_correct_lora(tmp_path):
    catalog = [{"slug": s, "short": s.upper()} for s in "abcdefghij"]
    slugs = list("abcdefghij")
    pairs = [
        (
            Query("a/1", tmp_path / "1.png", "a", "text-to-image: 'x'"),
            Ranking("a/1", slugs, [s.upper() for s in slugs], [0.1] * 10),
        ),
        (
            Query("c/1", tmp_path / "2.png", "c", "img2img from faces"),
            Ranking("c/1", slugs[::-1], [s.upper() for s in slugs[::-1]], [0.1] * 10),
        ),
    ]
    t = table3(pairs, catalog)
    assert list(t["rank_of_correct"]) == [1, 8] and t.loc[0, "1st"] == "A" and t.loc[1, "8th"] == "C"
    m = evaluate_queries(pairs, 10)
    assert m["all"]["mrr"] == pytest.approx((1 + 1 / 8) / 2)
    assert m["text-to-image"]["top1"] == 1.0 and m["img2img"]["top1"] == 0.0
    out = write_table3(t, m["all"], tmp_path / "table3")
    md = open(out["md"]).read()
    assert "| Image1 | **A** | B |" in md and "| D | **C** | B | 8 |" in md and "top-1 50.0 %" in md
    assert Image.open(out["png"]).size[0] > 500
    # a catalog of fewer than 9 LoRAs: as many columns as LoRAs
    few = [{"slug": s, "short": s.upper()} for s in "abcde"]
    pairs5 = [(Query("a/1", tmp_path / "1.png", "b", ""), Ranking("a/1", list("abcde"), list("ABCDE"), [0.2] * 5))]
    t5 = table3(pairs5, few)
    assert "5th" in t5.columns and "6th" not in t5.columns
    assert (
        "| Image1 | A | **B** | C | D | E | 2 |"
        in open(write_table3(t5, retrieval_metrics([2]), tmp_path / "t5")["md"]).read()
    )


def test_style_similarity_is_one_for_identical_images_and_lower_for_another_style(ranker_env, tmp_path):
    cfg, _, _ = ranker_env
    ranker = Ranker.from_profile(cfg)
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    flat = Image.new("RGB", (64, 64), (240, 200, 40))
    assert ranker.style_similarity(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ranker.style_similarity(a, a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) > ranker.style_similarity(a, flat)


def test_generate_cli_applies_the_lora(tiny_cfg, catalog, tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(tiny_cfg))
    from lorafind_utils import resolve

    base = str(resolve("data/images/variety/004_paintbrushes.jpg"))
    outs = []
    for lora in ("disco", "cloudy"):
        out = tmp_path / f"{lora}.png"
        assert (
            main(
                ["generate", "--profile", str(prof), "--lora", lora, "--image", base, "--seed", "3", "--out", str(out)]
            )
            == 0
        )
        outs.append(np.asarray(Image.open(out), dtype=np.int16))
    assert outs[0].shape == (64, 64, 3) and np.abs(outs[0] - outs[1]).mean() > 1  # the LoRA changes the output
    assert main(["generate", "--profile", str(prof), "--lora", "nope", "--image", base]) == 2
    assert "unknown LoRA 'nope'" in capsys.readouterr().err


def test_style_samples_are_unseen_photos_in_the_entrys_true_style(tiny_cfg, catalog, tiny_pipe, tiny_root, tmp_path):
    from conftest import tiny_overrides

    from lorafind_utils.core.config import stage_params
    from lorafind_utils.core.images import load_rgb, read_base_set, square_resize
    from lorafind_utils.core.styles import get_style
    from lorafind_utils.stages.retrieval import make_queries, read_queries

    data = yaml.safe_load(open(tiny_cfg["catalog"]))
    styles = {"anime": "cartoon", "xiaorensu": "sepia print"}
    for e in data["loras"]:
        if e["slug"] in styles:
            e["style"] = styles[e["slug"]]
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump(data))
    # its own lora_dir: the shared one's files are built for the shared catalog
    cfg = load_profile("standin", {**tiny_overrides(tiny_root), "catalog": str(cat), "runs_dir": str(tmp_path / "runs"),
                                "lora_dir": str(tmp_path / "loras")})
    p = dict(stage_params(cfg, "01_synthesize"), prompts=[], query_set="faces", images_per_lora=0, seed=1, strength=0.6,
             guidance_scale=1.0, style_query_set="variety", style_query_images=2)
    man = make_queries(cfg, p, tmp_path / "q", pipe=tiny_pipe, progress=False)
    assert [(q["lora"], q["how"].split(":")[0]) for q in man["queries"]] == [("anime", "style sample")] * 2 + [
        ("xiaorensu", "style sample")] * 2
    photos = read_base_set(cfg["base_images"]["variety"])[:2]
    for q in man["queries"]:
        b = next(x for x in photos if q["base_image"] == f"variety/{x.id}")
        want = get_style(styles[q["lora"]]).fn(square_resize(load_rgb(b.path), p["resolution"]))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "q" / q["file"]).convert("RGB")), np.asarray(want))
    qs = read_queries(tmp_path / "q", load_catalog(cfg))
    assert {q.how.split(" ")[0] for q in qs} == {"style"} and len(qs) == 4
    assert make_queries(cfg, p, tmp_path / "q", pipe=tiny_pipe, progress=False) == man  # finished: read back
    with pytest.raises(ValueError, match="other parameters"):
        make_queries(cfg, {**p, "style_query_images": 3}, tmp_path / "q", pipe=tiny_pipe, progress=False)
    data["loras"][0]["style"] = "crayon"
    cat.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="LoRA anime: unknown style 'crayon'"):
        make_queries(cfg, p, tmp_path / "q2", pipe=tiny_pipe, progress=False)
    assert not (tmp_path / "q2").exists()  # refused before anything was made


def test_table3_figure_shows_at_most_36_queries_spread_over_all(monkeypatch, tmp_path):
    import pandas as pd

    from lorafind_utils.core import figures

    seen = {}
    monkeypatch.setattr(
        figures, "table_png", lambda cells, header, path, title, **kw: seen.update(cells=cells, **kw) or path
    )
    ords = ["1st", "2nd"]

    def df(n):
        return pd.DataFrame([{"query": f"Image{i}", "correct": "A", "1st": "A", "2nd": "B", "rank_of_correct": 1}
                             for i in range(1, n + 1)])

    figures.table3_png(df(360), ords, "Over 360 queries.", tmp_path / "t.png")
    labels = [c[0] for c in seen["cells"]]
    assert len(labels) == 36 and labels[0] == "Image1" and labels[-1] == "Image360" and len(set(labels)) == 36
    assert seen["caption"].startswith("36 of the 360 queries shown") and len(seen["highlight_cells"]) == 36
    figures.table3_png(df(12), ords, "Over 12 queries.", tmp_path / "t.png")
    assert [c[0] for c in seen["cells"]] == [f"Image{i}" for i in range(1, 13)] and seen[
        "caption"
    ] == "Over 12 queries."
