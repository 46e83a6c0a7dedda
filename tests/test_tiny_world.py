"""The shipped tiny world (data/tiny_world, the `tiny` profile): it loads through diffusers' own
``from_pretrained`` / ``load_lora_weights`` path, its files are the ones record.json hashed, the profile
installs the LoRAs into its lora_dir (and refuses a changed one), and a LoRA paints its style: on held-out
photos its output is nearer the true style than the base model's output is."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_world as tw

from lorafind_utils.core.config import load_catalog, load_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld")
    return load_profile("tiny", {"runs_dir": str(root / "runs"), "lora_dir": str(root / "loras"),
                                 "figures_dir": str(root / "fig")})


def test_record_hashes_every_shipped_file_and_the_catalog_matches():
    rec = json.loads(tw.RECORD.read_text())
    files = {str(p.relative_to(REPO)) for p in tw.shipped_files()}
    assert files == set(rec["files"]) and rec["shipped_mb"] <= 30
    for rel, f in rec["files"].items():
        assert tw.sha256(REPO / rel) == f["sha256"], rel
    assert rec["strength"] == load_profile("tiny")["stages"]["01_synthesize"]["strength"]
    for part in ("codec", "denoiser", "controlnet"):
        assert rec[part]["steps"] > 0 and rec[part]["seconds"] > 0
    assert all(r["objective"] == "bridge" for r in rec["loras"].values())


def test_profile_installs_the_shipped_loras_and_refuses_a_changed_one(cfg):
    from lorafind_utils.models.pipelines import prepare_loras

    catalog = prepare_loras(cfg)
    assert len(catalog) == 12
    for e in catalog:
        assert Path(e["path"]).read_bytes() == (tw.LORA_DIR / e["file"]).read_bytes()
    bad = dict(cfg, lora_dir=str(Path(cfg["lora_dir"]).parent / "bad_loras"),
               models={**cfg["models"], "loras": str(Path(cfg["lora_dir"]).parent / "shipped_copy")})
    shutil.copytree(tw.LORA_DIR, bad["models"]["loras"])
    f = Path(bad["models"]["loras"]) / load_catalog(bad)[3]["file"]
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match the catalog's sha256"):
        prepare_loras(bad)


def test_a_lora_paints_its_style_on_held_out_photos(cfg):
    from lorafind_utils.core.styles import get_style
    from lorafind_utils.models.pipelines import load_pipeline, prepare_loras

    catalog = {e["slug"]: e for e in prepare_loras(cfg)}
    pipe = load_pipeline(cfg, "cpu")
    p = cfg["stages"]["01_synthesize"]
    ids, ims = tw.heldout_images(4)
    plain = tw.restyle_with(pipe, None, "none", ids, ims, p["strength"])
    for slug in ("xsarchitecture", "liuli"):  # pencil sketch (white page), neon glow (dark page)
        truth = [get_style(slug).fn(im) for im in ims]
        out = tw.restyle_with(pipe, Path(catalog[slug]["path"]), slug, ids, ims, p["strength"])
        gain = tw.psnr(out, truth) - tw.psnr(plain, truth)
        assert gain > 2.0, (slug, gain)  # dB nearer the true style than the base model alone
