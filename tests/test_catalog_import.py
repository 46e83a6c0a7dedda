"""Catalog import: fetch (loopback Civitai) -> check -> restyle -> index hook, per-LoRA statuses, resume."""
import json
import os

import pytest
import test_fetch
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file, save
from test_fetch import FILES, _pickle_bytes

import lorafind_utils.models.restyle as rs
import lorafind_utils.stages.synthesis as syn
from lorafind_utils.catalog.bulk_import import file_slugs, import_catalog, read_source, slugify
from lorafind_utils.core.config import SLUG, load_catalog, load_profile

server, base = test_fetch.server, test_fetch.base  # the loopback "Civitai" server's fixtures


def _sdxl_bytes(path) -> bytes:
    """A tiny LoRA renamed to SDXL's two-text-encoder layout (lora_te1_ keys)."""
    return save({k.replace("lora_te_", "lora_te1_"): v for k, v in load_file(str(path)).items()})


@pytest.fixture
def params(stage_params):
    return dict(stage_params, sets=["variety"], max_images=2, batch_size=2, workers=1, threads=1)


@pytest.fixture
def cfg(tiny_root, tmp_path):
    return load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(tmp_path / "runs")})


@pytest.fixture
def count_restyles(monkeypatch):
    calls = []
    real = rs.restyle

    def counting(pipe, prepared, seeds, p, **kw):
        calls.append(len(prepared))
        return real(pipe, prepared, seeds, p, **kw)

    monkeypatch.setattr(rs, "restyle", counting)
    return calls


def _read(p):
    return json.loads(p.read_text())


def test_slugs_pass_the_catalog_rule_and_are_stable():
    assert slugify("My LoRA (v2)!") == "My_LoRA_v2"
    assert slugify("..__") == "lora" and slugify("-x-") == "x"
    names = ["x.safetensors", "x.ckpt", "a b.safetensors", "a_b.safetensors", "é" * 300 + ".safetensors"]
    slugs = file_slugs(names)
    assert slugs["x.safetensors"] == "x" and slugs["a_b.safetensors"] == "a_b"
    assert slugs["x.ckpt"].startswith("x-") and slugs["a b.safetensors"].startswith("a_b-")
    assert len(set(slugs.values())) == len(names) and all(SLUG.fullmatch(s) for s in slugs.values())
    assert file_slugs(list(reversed(names))) == slugs  # the order files are listed in changes nothing


def test_list_sources_are_read_and_checked(tmp_path):
    p = tmp_path / "ids.yaml"
    p.write_text("[60568, '19065', {id: 42314, slug: chinese_ink, sha256: ABC},"
                 " 'https://civitai.com/models/1?modelVersionId=7']\n")
    kind, entries = read_source(p)
    assert kind == "civitai"
    assert [(e["slug"], e["source"]["civitai_version_id"]) for e in entries] == [
        ("civitai_60568", 60568), ("civitai_19065", 19065), ("chinese_ink", 42314), ("civitai_7", 7)]
    assert entries[2]["sha256"] == "abc"
    (tmp_path / "j.json").write_text(json.dumps({"loras": [1, 1]}))
    with pytest.raises(ValueError, match="entry 2: Civitai model version 1 is listed twice"):
        read_source(tmp_path / "j.json")
    (tmp_path / "b.yaml").write_text("[12, 'twelve']")
    with pytest.raises(ValueError, match="entry 2: 'twelve' is not a Civitai model-version id"):
        read_source(tmp_path / "b.yaml")
    (tmp_path / "s.yaml").write_text("[{id: 3, slug: ../x}]")
    with pytest.raises(ValueError, match="slug '../x' is not a plain name"):
        read_source(tmp_path / "s.yaml")


def test_civitai_import_bad_entries_are_marked_and_the_rest_finish(cfg, catalog, params, tiny_pipe, base, server,
                                                                    tmp_path, monkeypatch, count_restyles):
    good = {e["slug"]: open(e["path"], "rb").read() for e in catalog}
    monkeypatch.setitem(FILES, "101", good["anime"])
    monkeypatch.setitem(FILES, "102", good["disco"])
    monkeypatch.setitem(FILES, "666", _pickle_bytes())
    monkeypatch.setitem(FILES, "777", _sdxl_bytes(catalog[0]["path"]))
    monkeypatch.setitem(FILES, "103", FILES["a"])  # an SD1.5-sized LoRA: 320-wide layers the tiny base lacks
    src = tmp_path / "ids.yaml"
    src.write_text("[101, 666, 404, 777, 103, 102]\n")
    dest = tmp_path / "import"
    kw = dict(params=params, pipe=tiny_pipe, progress=False, download_base=f"{base}/file", log=lambda *a: None)

    s = import_catalog(cfg, src, dest, **kw)
    st = {k: v["status"] for k, v in s["loras"].items()}
    assert st["civitai_101"] == st["civitai_102"] == "ok"
    assert st["civitai_666"].startswith("refused: civitai_666.safetensors: this is a pickle")
    assert st["civitai_777"].startswith("refused: civitai_777.safetensors: an SDXL LoRA")
    assert st["civitai_103"].startswith("refused: civitai_103.safetensors: ") and "has shape 32" in st["civitai_103"]
    assert st["civitai_404"].startswith("failed: fetch: ") and "HTTP 404" in st["civitai_404"]
    assert (s["total"], s["ok"], s["refused"], s["failed"], s["restyled"]) == (6, 2, 3, 1, 2)
    assert _read(dest / "summary.json") == s
    for slug in ("civitai_101", "civitai_102"):
        f = _read(dest / "status" / f"{slug}.json")
        assert (f["status"], f["step"], f["images"], f["download"]) == ("ok", "restyled", 2, "downloaded")
        assert f["sha256"] == __import__("hashlib").sha256(FILES[slug[-3:]]).hexdigest()
        assert len(list((dest / "synth" / "variety" / slug).glob("*.png"))) == 2
    assert sorted(p.name for p in (dest / "loras" / "quarantine").iterdir()) == [
        "civitai_103.safetensors", "civitai_666.safetensors", "civitai_777.safetensors"]
    man = _read(dest / "synth" / "manifest.json")
    assert [e["slug"] for e in man["loras"]] == ["civitai_101", "civitai_102"]
    sub = dict(cfg, catalog=str(dest / "catalog.yaml"), lora_dir=str(dest / "loras"))
    assert [e["slug"] for e in load_catalog(sub)] == ["civitai_101", "civitai_102"]  # a usable catalog
    assert sum(count_restyles) == 4

    # Rerun with an index hook that fails for one LoRA: nothing is downloaded again but the 404, no
    # image is remade, the hook sees both restyled LoRAs.
    server.log.clear()
    count_restyles.clear()
    seen = []

    def index(slug, status, synth, manifest):
        seen.append(slug)
        if slug == "civitai_102":
            raise RuntimeError("index full")

    s = import_catalog(cfg, src, dest, on_restyled=index, **kw)
    assert [r["path"] for r in server.log] == ["/file/404"]
    assert count_restyles == [] and seen == ["civitai_101", "civitai_102"]
    assert s["loras"]["civitai_101"] == {"status": "ok", "step": "indexed"}
    assert s["loras"]["civitai_102"]["status"] == "failed: index: RuntimeError: index full"

    # The missing version appears upstream: it is fetched and restyled; only its images are made,
    # the LoRA whose index step failed is indexed now, the refused ones are not tried again.
    monkeypatch.setitem(FILES, "404", good["pop_art"])
    server.log.clear()
    s = import_catalog(cfg, src, dest, on_restyled=lambda *a: None, **kw)
    assert [r["path"] for r in server.log] == ["/file/404"]
    assert count_restyles == [2]
    assert {k: v["status"] for k, v in s["loras"].items() if v["status"] == "ok"} == {
        "civitai_101": "ok", "civitai_404": "ok", "civitai_102": "ok"}
    assert all(s["loras"][k]["step"] == "indexed" for k in ("civitai_101", "civitai_102", "civitai_404"))
    man = _read(dest / "synth" / "manifest.json")
    assert [e["slug"] for e in man["loras"]] == ["civitai_101", "civitai_404", "civitai_102"]
    assert len(man["items"]) == 6


def test_folder_import_links_good_files_and_refuses_bad_ones(cfg, catalog, params, tiny_pipe, tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    good = src / "My Style (v2).safetensors"
    good.write_bytes(open(catalog[3]["path"], "rb").read())
    (src / "sdxl_style.safetensors").write_bytes(_sdxl_bytes(catalog[0]["path"]))
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, src / "old.pt")
    (src / "README.txt").write_text("not a LoRA")
    dest = tmp_path / "import"
    s = import_catalog(cfg, src, dest, params=params, pipe=tiny_pipe, progress=False, log=lambda *a: None)
    assert s["kind"] == "folder" and (s["total"], s["ok"], s["refused"], s["failed"]) == (3, 1, 2, 0)
    (slug,) = [k for k, v in s["loras"].items() if v["status"] == "ok"]
    assert slug.startswith("My_Style_v2-") and SLUG.fullmatch(slug)
    assert s["loras"]["old"]["status"].startswith("refused: old.pt: '.pt' files are Python pickles")
    assert s["loras"]["sdxl_style"]["status"].startswith("refused: sdxl_style.safetensors: an SDXL LoRA")
    linked = dest / "loras" / f"{slug}.safetensors"
    assert os.path.samefile(linked, good)  # a hard link, no copy
    assert not (dest / "loras" / "old.safetensors").exists() and good.exists()  # the user's files stay
    assert len(list((dest / "synth" / "variety" / slug).glob("*.png"))) == 2
    assert s["loras"][slug]["step"] == "restyled"


def test_a_lora_the_engine_refuses_or_fails_is_marked_and_the_others_restyle(cfg, catalog, params, tiny_pipe, tmp_path,
                                                                          monkeypatch):
    """What the Ray engine reports after the other jobs finished (LorasRefused / RestyleFailed) and the
    local engine's LoraError ("<file>: ...") mark just those LoRAs; the rest are restyled."""
    from lorafind_utils.engines.ray_cluster import LorasRefused, RestyleFailed
    from lorafind_utils.models.loras import LoraError

    src = tmp_path / "mine"
    src.mkdir()
    for e in catalog[:5]:  # anime, anime_background, xiaorensu, chinese_ink, disco
        (src / f"{e['slug']}.safetensors").write_bytes(open(e["path"], "rb").read())
    real, errors = syn.synthesize, [
        RestyleFailed({"anime": "OutOfMemoryError: CUDA out of memory"}, {"xiaorensu": "diffusers applied 3 of 4"}),
        LorasRefused({"anime_background": "diffusers applied 1 of 2 modules"}),
        LoraError("chinese_ink.safetensors: diffusers applied 5 of 6 modules in the file"),
    ]
    runs = []

    def flaky(cfg, params, out_dir, **kw):
        runs.append([e["slug"] for e in load_catalog(cfg)])
        if errors:
            raise errors.pop(0)
        return real(cfg, params, out_dir, **kw)

    monkeypatch.setattr(syn, "synthesize", flaky)
    s = import_catalog(
        cfg, src, tmp_path / "import", params=params, pipe=tiny_pipe, progress=False, log=lambda *a: None
    )
    assert runs == [["anime", "anime_background", "chinese_ink", "disco", "xiaorensu"],
                    ["anime_background", "chinese_ink", "disco"], ["chinese_ink", "disco"], ["disco"]]
    st = {k: v["status"] for k, v in s["loras"].items()}
    assert st == {"anime": "failed: restyle: OutOfMemoryError: CUDA out of memory",
                  "xiaorensu": "refused: diffusers applied 3 of 4",
                  "anime_background": "refused: diffusers applied 1 of 2 modules",
                  "chinese_ink": "refused: chinese_ink.safetensors: diffusers applied 5 of 6 modules in the file",
                  "disco": "ok"}
    assert s["loras"]["disco"]["step"] == "restyled" and len(list((tmp_path / "import" / "synth").rglob("*.png"))) == 2
    # a rerun retries the failed LoRA only (refusals are final)
    monkeypatch.setattr(syn, "synthesize", real)
    s = import_catalog(
        cfg, src, tmp_path / "import", params=params, pipe=tiny_pipe, progress=False, log=lambda *a: None
    )
    assert s["loras"]["anime"] == {"status": "ok", "step": "restyled"} and (s["ok"], s["refused"]) == (2, 3)
    assert [e["slug"] for e in json.loads((tmp_path / "import" / "synth" / "manifest.json").read_text())["loras"]] == [
        "anime", "disco"]
