"""A hostile but honest user: shared catalogs, tokens, two writers at once, kills, corrupt artifacts.

Each test here failed on the code before these guards were added."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides
from PIL import Image
from test_fetch import FILES, TOKEN, _entry, _paper_cfg, base, server  # noqa: F401 (fixtures)

from lorafind_utils.app.cli import main
from lorafind_utils.core import download as download_mod
from lorafind_utils.core.config import CatalogError, load_catalog, load_profile
from lorafind_utils.core.download import token_for
from lorafind_utils.core.files import RunLocked, atomic_path, run_lock

ROOT = Path(__file__).resolve().parent.parent


# --- security: catalogs ------------------------------------------------------------------------

HOSTILE = {
    "file with ..": {"slug": "anime", "file": "../../../../outside/x.safetensors"},
    "absolute file": {"slug": "anime", "file": "/tmp/lorafind-outside/x.safetensors"},
    "slug with ..": {"slug": "../../somewhere"},
    "slug with /": {"slug": "a/b"},
    "hidden slug": {"slug": ".hidden"},
}


def _catalog_cfg(tmp_path, entry, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"loras": [{**entry, **extra}]}))
    return load_profile("standin", {"catalog": str(cat), "lora_dir": str(tmp_path / "loras"),
                                 "runs_dir": str(tmp_path / "runs")}), cat


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_catalog_entry_is_refused_when_loaded_naming_it(tmp_path, case):
    cfg, cat = _catalog_cfg(tmp_path, HOSTILE[case])
    with pytest.raises(CatalogError, match=r"catalog\.yaml: entry 1") as e:
        load_catalog(cfg)
    assert "lora_dir" in str(e.value) or "plain name" in str(e.value)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_no_writer_writes_outside_its_folder_for_a_hostile_catalog(tmp_path, base, case, capsys):  # noqa: F811
    """stage 01 (which builds the tiny LoRA files), fetch (LoRA files) and the thumbnail fetcher."""
    from lorafind_utils.catalog.civitai import fetch_thumbnails
    from lorafind_utils.catalog.fetch import fetch_loras

    entry = {**HOSTILE[case], "seed": 101, "rank": 4, "alpha": 4, "strength": 1.0, "layout": "lora",
             "url": f"{base}/file/a", "civitai_version_id": 501}
    cfg, _ = _catalog_cfg(tmp_path / "w", entry)
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(cfg))
    before = set(p for p in tmp_path.rglob("*"))
    assert main(["synthesize", "--profile", str(prof), "--max-images", "1"]) == 2
    assert "entry 1" in capsys.readouterr().err
    for fn in (fetch_loras, fetch_thumbnails):
        with pytest.raises(CatalogError):
            fn(cfg, progress=False)
    assert not Path("/tmp/lorafind-outside").exists() and not (tmp_path.parent / "outside").exists()
    new = set(p for p in tmp_path.rglob("*")) - before
    assert all(p.name.endswith(".lock") or p.is_dir() for p in new), new  # nothing written but a run lock


def test_a_nested_file_inside_lora_dir_is_fine(tmp_path):
    cfg, _ = _catalog_cfg(tmp_path, {"slug": "anime", "file": "sub/anime.safetensors"})
    assert load_catalog(cfg)[0]["path"] == str(tmp_path / "loras" / "sub" / "anime.safetensors")


def test_a_symlink_out_of_lora_dir_is_refused(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "loras" / "link").symlink_to(tmp_path / "elsewhere")
    cfg, _ = _catalog_cfg(tmp_path, {"slug": "anime", "file": "link/anime.safetensors"})
    with pytest.raises(CatalogError, match="outside lora_dir"):
        load_catalog(cfg)


# --- security: the token -----------------------------------------------------------------------

def test_the_token_is_for_civitais_hosts_only():
    t = "tok"
    assert token_for("https://civitai.com/api/download/models/1", t) == t
    assert token_for("https://image.civitai.com/x.jpg", t) == t
    for url in ("https://evilcivitai.com/x", "https://civitai.com.evil.org/x", "http://civitai.com/x",
                "https://127.0.0.1:8000/x", "https://example.org/civitai.com"):
        assert token_for(url, t) is None, url


def test_no_token_reaches_a_host_that_a_catalog_names(base, server, tmp_path, monkeypatch):  # noqa: F811
    """The loopback server poses as a LoRA host; with the default allow-list it never sees the token."""
    from lorafind_utils.catalog.civitai import fetch_thumbnails
    from lorafind_utils.catalog.fetch import fetch_loras

    monkeypatch.setattr(download_mod, "TOKEN_HOSTS", ("civitai.com",))  # the shipped allow-list
    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    cfg = _paper_cfg(tmp_path, base, [_entry("anime", f"{base}/file/a"), _entry("xredir", f"{base}/xredirect/b")])
    cfg["runs_dir"] = str(tmp_path / "runs")
    fetch_loras(cfg, progress=False)
    cat = yaml.safe_load(open(cfg["catalog"]))
    cat["loras"] = [{**cat["loras"][0], "civitai_version_id": 501}]  # a version with preview images
    open(cfg["catalog"], "w").write(yaml.safe_dump(cat))
    fetch_thumbnails(cfg, progress=False, api_base=f"{base}/api/v1")
    assert len(server.log) >= 6  # files, a redirect, the API and its preview images
    assert all(r["authorization"] is None for r in server.log)


# --- losing or mixing data ---------------------------------------------------------------------

def _hammer(path: str, tag: str, n: int, q) -> None:
    errors = 0
    for i in range(n):
        try:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(f"{tag}:{i}:" + "x" * 4000)
        except OSError:
            errors += 1
    q.put(errors)


def test_two_processes_writing_one_file_neither_fail_nor_tear(tmp_path):
    path = tmp_path / "shared.json"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(path), t, 1500, q)) for t in "ab"]
    for p in procs:
        p.start()
    torn = reads = 0
    while any(p.is_alive() for p in procs):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        reads += 1
        tag, i, body = text.split(":", 2)
        torn += not (tag in "ab" and body == "x" * 4000)
    for p in procs:
        p.join()
    assert [q.get(), q.get()] == [0, 0] and torn == 0 and reads > 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(tiny_cfg, catalog, stage_params, tmp_path):
    from lorafind_utils.stages.synthesis import synthesize

    out = tmp_path / "synth"
    with run_lock(out, "stage 01"):
        with pytest.raises(RunLocked, match=rf"{out} is being written by pid {os.getpid()} on "):
            synthesize(tiny_cfg, {**stage_params, "max_images": 1}, out, progress=False, workers=1)
    with run_lock(out):  # released: free again
        pass


def test_params_json_is_written_only_after_the_parameters_pass(tiny_cfg, catalog, stage_params, tmp_path):
    from lorafind_utils.stages.synthesis import synthesize

    out = tmp_path / "synth"
    with pytest.raises(ValueError, match="unknown base-image set 'nope'"):
        synthesize(tiny_cfg, {**stage_params, "sets": ["nope"], "max_images": 1}, out, progress=False, workers=1)
    assert not (out / "params.json").exists()
    man = synthesize(tiny_cfg, {**stage_params, "sets": ["variety"], "max_images": 1}, out, progress=False, workers=1)
    assert len(man["items"]) == len(catalog)


KILLER = textwrap.dedent("""
    import os, signal, sys, yaml
    import lorafind_utils.models.restyle as rs
    from lorafind_utils.core.config import load_profile, stage_params
    from lorafind_utils.stages.synthesis import synthesize
    cfg = load_profile(sys.argv[1])
    p = dict(stage_params(cfg, "01_synthesize"), sets=["variety"], max_images=6, batch_size=4, workers=1, threads=1)
    real, n = rs.atomic_path, [0]
    class Killing:
        def __init__(self, path):
            self.cm = real(path)
        def __enter__(self):
            return self.cm.__enter__()
        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            n[0] += 1
            if n[0] == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)  # a kill between two images of one batch
            return out
    rs.atomic_path = Killing
    synthesize(cfg, p, sys.argv[2], progress=False, workers=1)
""")


def test_a_synthesis_killed_mid_batch_resumes_byte_identical(tiny_root, catalog, tmp_path):
    """Killed after the 5th image (the 1st of the 2nd batch, batches of 4): the resumed run redoes that
    whole batch, so every PNG equals an uninterrupted run's -- whatever the CPU's summation order."""
    from lorafind_utils.stages.synthesis import synthesize

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(load_profile("standin", tiny_overrides(tiny_root))))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    r = subprocess.run([sys.executable, "-c", KILLER, str(prof), str(killed), "5"], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert len(list(killed.rglob("*.png"))) == 5 and not (killed / "manifest.json").exists()
    cfg = load_profile(prof)
    from lorafind_utils.core.config import stage_params

    p = dict(stage_params(cfg, "01_synthesize"), sets=["variety"], max_images=6, batch_size=4, workers=1, threads=1)
    import lorafind_utils.models.restyle as syn  # where stage 01's batches call restyle

    calls = []
    real = syn.restyle

    def spy(pipe, prepared, seeds, params, **kw):
        calls.append([x.image.id for x in prepared])
        return real(pipe, prepared, seeds, params, **kw)

    syn.restyle = spy
    try:
        synthesize(cfg, p, killed, progress=False, workers=1)
        first = calls[0]
        calls.clear()
        synthesize(cfg, p, clean, progress=False, workers=1)
    finally:
        syn.restyle = real
    # the resumed run's first call is the interrupted batch, whole (2 images, not the 1 missing)
    assert first == calls[1]
    files = sorted(q.relative_to(clean) for q in clean.rglob("*.png"))
    assert files == sorted(q.relative_to(killed) for q in killed.rglob("*.png")) and len(files) == 6 * len(catalog)
    assert all((killed / f).read_bytes() == (clean / f).read_bytes() for f in files)
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_a_truncated_image_is_made_again_not_trusted(tiny_cfg, catalog, stage_params, tmp_path, capsys):
    from lorafind_utils.stages.synthesis import synthesize

    out = tmp_path / "synth"
    p = {**stage_params, "sets": ["variety"], "max_images": 2}
    man = synthesize(tiny_cfg, p, out, progress=False, workers=1)
    victim = out / man["items"][0]["file"]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    synthesize(tiny_cfg, p, out, progress=False, workers=1)
    assert victim.read_bytes() == good
    assert "1 unreadable images" in capsys.readouterr().out


def _train_cfg(tmp_path):
    """A stage-01-shaped folder of small class-tinted images (no diffusion needed)."""
    cfg = load_profile("standin", {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig"),
                                "stages": {"02_finetune": {"image_size": 32, "epochs": 1, "batch_size": 16,
                                                           "linear_probe": False}}})
    slugs = [e["slug"] for e in load_catalog(cfg)]
    synth = tmp_path / "runs" / "synth"
    ids = [f"{i:03d}_thing" for i in range(5)]
    rng = np.random.default_rng(0)
    for k, slug in enumerate(slugs):
        (synth / "variety" / slug).mkdir(parents=True)
        for i in ids:
            px = rng.integers(0, 120, (32, 32, 3)) + np.array([10 * k, 200 - 15 * k, 60])
            Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(synth / "variety" / slug / f"{i}.png")
    (synth / "manifest.json").write_text(json.dumps({"sets": {"variety": ids}, "loras": [{"slug": s} for s in slugs],
                                                     "items": []}))
    return cfg


def test_an_interrupted_training_run_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    import lorafind_utils.stages.fine_tuning as ft
    from lorafind_utils.core.config import stage_params
    from lorafind_utils.rank.classifier_ranker import Ranker

    cfg = _train_cfg(tmp_path)
    p = stage_params(cfg, "02_finetune")
    res = ft.run_finetune(cfg, p, progress=False)
    run = Path(res["out_dir"])
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    assert {"model.safetensors", "labels.json", "history.csv", "metrics.json", "split.json"} <= set(before)

    def crash(history, path):  # killed right after the new history.csv is written
        Path(path).write_text("step,new\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "write_history", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.run_finetune(cfg, {**p, "epochs": 2}, progress=False)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # the old run, whole
    assert not [d for d in run.parent.iterdir() if d.name.startswith(".finetune_variety.partial")]
    Ranker.from_profile(cfg)  # usable
    (run / "metrics.json").unlink()  # a run without its last file never finished
    with pytest.raises(FileNotFoundError, match="unfinished training run"):
        Ranker.from_profile(cfg)


# --- tracebacks where a message belongs --------------------------------------------------------

@pytest.fixture
def trained(tmp_path):
    from lorafind_utils.models.classifier import build_model, save_checkpoint

    cfg = load_profile("standin", {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "fig")})
    slugs = [e["slug"] for e in load_catalog(cfg)]
    run = tmp_path / "runs" / "train" / "finetune_variety"
    save_checkpoint(build_model(len(slugs), hidden=16, weights="none", backbone="efficientnet_lite0"), slugs, run,
                    {"hidden": 16, "image_size": 32})
    (run / "metrics.json").write_text("{}")
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(cfg))
    img = tmp_path / "q.png"
    Image.new("RGB", (48, 48), (200, 30, 90)).save(img)
    return cfg, prof, run, img


@pytest.mark.parametrize("damage,expect", [
    ("truncate model", r"model\.safetensors: cannot be loaded .*retrain it"),
    ("empty labels", r"labels\.json: not a label map .*retrain it"),
    ("garbage labels", r"labels\.json: not a label map"),
])
def test_a_broken_checkpoint_is_named_with_how_to_rebuild(trained, capsys, damage, expect):
    cfg, prof, run, img = trained
    if damage == "truncate model":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (run / "labels.json").write_text("{}" if damage == "empty labels" else "\x00\x01 not json")
    assert main(["rank", str(img), "--profile", str(prof)]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(expect, err) and "Traceback" not in err
    from test_widget import _upload

    from lorafind_utils.app.widget import RankWidget

    w = RankWidget(cfg)
    w.upload.value = _upload(img.read_bytes())  # the upload handler runs: shown in the panel, not raised
    assert "cannot be used" in w.status.value


@pytest.mark.parametrize("manifest,expect", [(None, r"manifest\.json not found: .*run stage 01"),
                                             ("{garbage", r"manifest\.json is not valid JSON.*run stage 01"),
                                             ("[1, 2]", r"manifest\.json is not a stage-01 manifest")])
def test_a_missing_or_garbage_manifest_says_run_stage_01(tmp_path, manifest, expect):
    from lorafind_utils.models.classifier import load_synth_set

    (tmp_path / "synth").mkdir()
    if manifest is not None:
        (tmp_path / "synth" / "manifest.json").write_text(manifest)
    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        load_synth_set(tmp_path / "synth", "variety", ["a"], 32)


def test_a_truncated_restyled_image_is_named_by_stage_02(tmp_path):
    from lorafind_utils.models.classifier import load_synth_set

    cfg = _train_cfg(tmp_path)
    slugs = [e["slug"] for e in load_catalog(cfg)]
    bad = tmp_path / "runs" / "synth" / "variety" / slugs[3] / "002_thing.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{bad}: unreadable restyled image .*run stage 01 again"):
        load_synth_set(tmp_path / "runs" / "synth", "variety", slugs, 32)


def test_a_valid_100_megapixel_png_is_accepted_as_the_readme_promises(tmp_path):
    from lorafind_utils.core.images import load_rgb

    big = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 77).save(big)  # 100 MP, above Pillow's 89.5 MP warning
    assert load_rgb(big).size == (10_000, 10_000)


def test_the_upload_limit_counts_the_bytes_received_not_the_declared_size():
    from lorafind_utils.app.widget import MAX_UPLOAD_BYTES, RankWidget
    from lorafind_utils.core.images import ImageError

    liar = ({"name": "x.png", "size": 10, "content": b"\0" * (MAX_UPLOAD_BYTES + 1)},)
    with pytest.raises(ImageError, match="too large"):
        RankWidget._read_upload(liar)


def test_top_must_be_positive(trained, capsys):
    _, prof, _, img = trained
    with pytest.raises(SystemExit) as e:
        main(["rank", str(img), "--profile", str(prof), "--top", "-3"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_rank_into_head_has_no_broken_pipe_error(trained):
    _, prof, _, img = trained
    cmd = f"{sys.executable} -m lorafind_utils.app.cli rank {' '.join([str(img)] * 400)} --profile {prof} | head -n 2"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr[-1500:]
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr
