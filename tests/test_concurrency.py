"""Two people sharing an index or a catalog: two real processes write at the same moment, nothing is lost.

Each writer is a separate Python process (the CLI's ``main`` or ``register``), started together through a
barrier file once both have imported everything. The children slow down ``StyleIndex.load`` and
``StyleIndex.save`` a little (``SLOW``) so that their read -> change -> save windows surely overlap: with
the read outside the lock, the second writer would save a stale copy (or be refused) every time."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides
from PIL import Image

from lorafind_utils.app.cli import main
from lorafind_utils.core import layout
from lorafind_utils.core.config import load_profile
from lorafind_utils.core.files import RunLocked
from lorafind_utils.rank import index_ops as indexing
from lorafind_utils.rank.style_index import StyleIndex

ROOT = Path(__file__).resolve().parents[1]
SLOW = 0.4  # seconds added after each index load and before each save in the children

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    import lorafind_utils.rank.index_ops, lorafind_utils.models.lora_training
    from lorafind_utils.app.cli import main
    from lorafind_utils.rank.style_index import StyleIndex

    slow = float(os.environ.get("LORAFIND_TEST_SLOW", "0"))
    if slow:  # widen the read -> save window (the race is the same, only easier to hit)
        load, save = StyleIndex.load.__func__, StyleIndex.save
        def slow_load(cls, *a, **k):
            out = load(cls, *a, **k)
            time.sleep(slow)
            return out
        def slow_save(self, *a, **k):
            time.sleep(slow)
            return save(self, *a, **k)
        StyleIndex.load, StyleIndex.save = classmethod(slow_load), slow_save

    ready, go, job = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    if job["kind"] == "cli":
        sys.exit(main(job["argv"]))
    elif job["kind"] == "register":
        from lorafind_utils.stages.style_lora import register
        register(job["catalog"], job["base"], job["trained"], job["lora_dir"])
    elif job["kind"] == "hold":  # hold the index lock until told to let go
        with lorafind_utils.rank.index_ops.index_lock(Path(job["folder"])):
            Path(job["held"]).touch()
            while not Path(job["release"]).exists():
                time.sleep(0.01)
""")


def _spawn(tmp_path: Path, name: str, job: dict, go: Path, slow: float = SLOW) -> tuple[subprocess.Popen, Path]:
    import json

    ready = tmp_path / f"{name}.ready"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAFIND_TEST_SLOW": str(slow), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(go), json.dumps(job)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _together(tmp_path: Path, jobs: dict[str, dict], timeout: float = 240) -> dict[str, tuple[int, str, str]]:
    """Start one process per job, release them at the same moment, return {name: (rc, stdout, stderr)}."""
    go = tmp_path / "go"
    go.unlink(missing_ok=True)
    procs = {n: _spawn(tmp_path, n, j, go) for n, j in jobs.items()}
    t0 = time.monotonic()
    try:
        while not all(r.exists() for _, r in procs.values()):
            dead = {n: p.poll() for n, (p, _) in procs.items() if p.poll() is not None}
            assert not dead, {n: procs[n][0].communicate() for n in dead}
            assert time.monotonic() - t0 < timeout, "children did not start"
            time.sleep(0.02)
        go.touch()
        out = {}
        for n, (p, _) in procs.items():
            so, se = p.communicate(timeout=timeout)
            out[n] = (p.returncode, so, se)
        return out
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def shared(tiny_root, tmp_path_factory):
    """A profile whose index (training-free encoder, no synthesis needed) two people share, and two
    folders of preview images, one picture each (so an entry is exactly its picture's embedding)."""
    root = tmp_path_factory.mktemp("shared")
    cfg = load_profile("standin", {**tiny_overrides(tiny_root), "runs_dir": str(root / "runs"),
                                   "stages": {"08_index": {"encoder": "imagenet", "variant": "prototype"},
                                              "02_finetune": {"weights": "none"}}})
    prof = root / "p.yaml"
    prof.write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(0)
    thumbs = {}
    for name, colour in (("ann_style", (230, 40, 40)), ("bob_style", (30, 60, 220))):
        d = root / name
        d.mkdir()
        px = np.clip(np.array(colour) + rng.normal(0, 60, (64, 64, 3)), 0, 255).astype(np.uint8)
        px[::8] = 255 - px[::8]  # stripes for one, different noise for the other
        Image.fromarray(px if name == "ann_style" else px.transpose(1, 0, 2)).save(d / "preview.png")
        thumbs[name] = d
    enc = indexing.make_encoder(cfg, "imagenet", progress=False)
    return cfg, prof, thumbs, enc


@pytest.fixture
def index_folder(shared):
    """A fresh index with three old entries (random prototypes)."""
    cfg, _, _, enc = shared
    rng = np.random.default_rng(1)
    ix = StyleIndex.create(enc.dim, enc.describe(), variant="prototype")
    for n in ("old_one", "old_two", "to_remove"):
        ix.add(n, rng.normal(size=enc.dim), {"short": n, "source": "synthesized", "n_images": 1})
    return ix.save(layout.index_dir(cfg, "imagenet", "prototype"))


def _cli(prof, *argv) -> dict:
    return {"kind": "cli", "argv": [*argv, "--profile", str(prof)]}


def _listed(prof, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["index", "list", "--profile", str(prof)]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]


def test_two_adds_of_different_names_at_once_both_land(shared, index_folder, tmp_path, capsys):
    cfg, prof, thumbs, _ = shared
    ranker = indexing.IndexRanker.from_profile(cfg)  # a long-lived reader (the widget's), opened before the adds
    assert sorted(ranker.slugs) == ["old_one", "old_two", "to_remove"]
    res = _together(tmp_path, {n: _cli(prof, "index", "add", "--thumbnails", str(d), "--name", n)
                               for n, d in thumbs.items()})
    for n, (rc, out, err) in res.items():
        assert rc == 0 and f"added {n}" in out, (n, rc, out, err)
    assert sorted(_listed(prof, capsys)) == ["ann_style", "bob_style", "old_one", "old_two", "to_remove"]
    # both are ranked: each preview finds its own entry first, in the reader opened before the adds too
    for r in (ranker, indexing.IndexRanker.from_profile(cfg)):
        ranks = r.rank_files([thumbs["ann_style"] / "preview.png", thumbs["bob_style"] / "preview.png"])
        assert [x.slugs[0] for x in ranks] == ["ann_style", "bob_style"]
        assert all(len(x.slugs) == 5 for x in ranks)


def test_an_add_racing_a_remove_both_take_effect(shared, index_folder, tmp_path, capsys):
    cfg, prof, thumbs, _ = shared
    res = _together(tmp_path, {"add": _cli(prof, "index", "add", "--thumbnails", str(thumbs["ann_style"]),
                                           "--name", "ann_style"),
                               "remove": _cli(prof, "index", "remove", "to_remove")})
    assert res["add"][0] == 0 and "added ann_style" in res["add"][1], res["add"]
    assert res["remove"][0] == 0 and "removed to_remove" in res["remove"][1], res["remove"]
    assert sorted(_listed(prof, capsys)) == ["ann_style", "old_one", "old_two"]
    ix = StyleIndex.load(index_folder)
    assert ix.entry("ann_style").meta["source"] == "thumbnails" and "to_remove" not in ix


def test_a_writer_that_cannot_get_its_turn_is_refused_naming_the_holder(shared, index_folder, tmp_path,
                                                                        monkeypatch):
    cfg, prof, thumbs, _ = shared
    before = (index_folder / "index.json").read_bytes()
    go, held, release = tmp_path / "go", tmp_path / "held", tmp_path / "release"
    holder, ready = _spawn(tmp_path, "holder", {"kind": "hold", "folder": str(index_folder), "held": str(held),
                                                "release": str(release)}, go, slow=0)
    try:
        go.touch()
        t0 = time.monotonic()
        while not held.exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() - t0 < 240
            time.sleep(0.02)
        monkeypatch.setattr(indexing, "INDEX_WAIT_S", 0.5)
        with pytest.raises(RunLocked, match=rf"being written by pid {holder.pid} on .*\(waited 0.5 s\)"):
            indexing.add_thumbnails(cfg, thumbs["bob_style"], "bob_style", log=lambda *a: None)
        assert (index_folder / "index.json").read_bytes() == before  # refused: nothing written, nothing "added"
        release.touch()
        assert holder.wait(timeout=60) == 0
        out = indexing.add_thumbnails(cfg, thumbs["bob_style"], "bob_style", log=lambda *a: None)  # free again
        assert out["entries"] == 4 and "bob_style" in StyleIndex.load(index_folder)
    finally:
        release.touch()
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


def test_two_registers_into_one_catalog_both_land(tmp_path):
    lora_dir, catalog = tmp_path / "loras", tmp_path / "trained_catalog.yaml"
    base = [{"slug": "base_lora", "name": "base", "short": "base", "file": "base_lora.safetensors",
             "path": str(lora_dir / "base_lora.safetensors")}]
    jobs = {}
    for n in ("run_a", "run_b"):
        kohya = tmp_path / f"{n}_kohya.safetensors"
        kohya.write_bytes(n.encode() * 100)
        jobs[n] = {"kind": "register", "catalog": str(catalog), "base": base, "lora_dir": str(lora_dir),
                   "trained": [{"slug": f"{n}_r4", "name": f"{n} r4", "kohya": str(kohya)}]}
    res = _together(tmp_path, jobs)
    assert all(rc == 0 for rc, _, _ in res.values()), res
    entries = yaml.safe_load(catalog.read_text())["loras"]
    assert sorted(e["slug"] for e in entries) == ["base_lora", "run_a_r4", "run_b_r4"]
    assert entries[0]["slug"] == "base_lora" and "path" not in entries[0]
    for n in ("run_a", "run_b"):
        e = next(e for e in entries if e["slug"] == f"{n}_r4")
        assert (lora_dir / e["file"]).read_bytes() == n.encode() * 100
    # a later register with one of them again replaces that entry, keeps the other
    (tmp_path / "run_a_kohya.safetensors").write_bytes(b"v2")
    from lorafind_utils.stages.style_lora import register

    register(catalog, base, [{**jobs["run_a"]["trained"][0]}], lora_dir)
    entries = yaml.safe_load(catalog.read_text())["loras"]
    assert [e["slug"] for e in entries].count("run_a_r4") == 1 and len(entries) == 3
    assert (lora_dir / "run_a_r4.safetensors").read_bytes() == b"v2"
