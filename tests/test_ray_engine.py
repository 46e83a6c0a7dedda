"""Stage 01 on Ray: the same files and manifest as a local run, byte for byte, also when a worker
process is SIGKILLed mid-job.

Every Ray run here is a subprocess in a new network namespace with only ``lo`` up (``unshare -n``):
outside one, Ray binds and dials the machine's own interface address and probes an outside resolver,
which tests must not. The subprocess prints its results as one JSON line.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from lorafind_utils.core.config import load_profile
from lorafind_utils.stages.synthesis import synthesize

LORAS = ("anime", "disco", "pop_art")  # a plain LoRA, a LoCon, a strong one

#: The Ray side, on 2 CPU actors: the catalog undisturbed; again with the second pipeline call of one
#: worker process SIGKILLing that process (armed by a file, fired once: the setup hook runs in every
#: Ray worker process, including the restarted one); and with one LoRA that diffusers refuses and one
#: whose job crashes (both logged each time they are loaded, to count attempts).
SCRIPT = r'''
import json, os, signal, sys, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import ray

args = json.load(open(sys.argv[1]))
ARM = args["arm"]


def kill_hook():
    import lorafind_utils.models.restyle as syn
    real, calls = syn.restyle, {"n": 0}

    def restyle(*a, **k):
        calls["n"] += 1
        if calls["n"] >= 2 and os.path.exists(ARM):  # one batch of this process's job is written
            try:
                fd = os.open(ARM + ".fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)

    syn.restyle = restyle
    real_load = syn.load_lora

    def load_lora(pipe, path, slug, **kw):
        if os.path.exists(ARM + ".faults"):
            with open(ARM + ".loads", "a") as f:
                f.write(slug + "\n")
            if slug == "anime":
                from lorafind_utils.models.loras import LoraError
                raise LoraError("anime.safetensors: diffusers applied 1 of 2 modules in the file (test)")
            if slug == "disco":
                raise RuntimeError("boom (test)")
        return real_load(pipe, path, slug, **kw)

    syn.load_lora = load_lora


t = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
         _temp_dir=args["ray_tmp"], runtime_env={"worker_process_setup_hook": kill_hook}, log_to_driver=False)
init_s = time.perf_counter() - t
from lorafind_utils.engines import ray_cluster as ray_engine
from lorafind_utils.stages.synthesis import synthesize

out = {"init_s": init_s, "runs": {}}
for name in ("plain", "killed"):
    if name == "killed":
        open(ARM, "w").close()
    t = time.perf_counter()
    man = synthesize(args["cfg"], args["params"], args["dirs"][name], progress=False, engine="ray", workers=2)
    out["runs"][name] = {"seconds": time.perf_counter() - t, "stats": ray_engine.last_stats, "manifest": man}
out["fired_pid"] = int(open(ARM + ".fired").read()) if os.path.exists(ARM + ".fired") else None
open(ARM + ".faults", "w").close()
try:
    synthesize(args["cfg"], args["params"], args["dirs"]["faults"], progress=False, engine="ray", workers=2)
except Exception as e:
    out["faults"] = {"error": type(e).__name__, "failed": getattr(e, "failed", None),
                     "refused": getattr(e, "refused", None), "stats": ray_engine.last_stats,
                     "loads": open(ARM + ".loads").read().split()}
ray.shutdown()
print("RESULT " + json.dumps(out))
'''


def _netns_ok() -> str | None:
    """None when ``unshare -n`` with a loopback works here, else why not."""
    for tool in ("unshare", "ip"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (util-linux / iproute2)"
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && ip -o addr show lo"],
                       capture_output=True, text=True)
    if r.returncode != 0 or "127.0.0.1" not in r.stdout:
        return f"cannot make a network namespace (`unshare -n`, needs root or user namespaces): {r.stderr.strip()}"
    return None


def run_in_netns(script: str, args: dict, tmp: Path, timeout: float = 400) -> dict:
    """Run ``script`` (Python) in a new network namespace with only ``lo`` up; its ``RESULT <json>`` line."""
    why = _netns_ok()
    if why:
        pytest.skip(f"Ray tests need an isolated network namespace: {why}")
    pytest.importorskip("ray", reason="ray is a dependency of lorafind (pyproject); install it")
    (tmp / "script.py").write_text(script)
    (tmp / "args.json").write_text(json.dumps(args))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    cmd = f'ip link set lo up && exec "{sys.executable}" "{tmp / "script.py"}" "{tmp / "args.json"}"'
    r = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def ray_runs(tiny_root, catalog, stage_params, tiny_pipe, tmp_path_factory):
    """A 3-LoRA catalog (3 images each, batch 2: two batches per LoRA) restyled locally in this process,
    then on Ray (2 CPU actors) undisturbed and with one worker SIGKILLed mid-job."""
    tmp = tmp_path_factory.mktemp("ray")
    loras = tmp / "loras"
    loras.mkdir()
    by_slug = {e["slug"]: e for e in catalog}
    for s in LORAS:
        shutil.copy(by_slug[s]["path"], loras / f"{s}.safetensors")
    (tmp / "catalog.yaml").write_text(yaml.safe_dump(
        {"loras": [{"slug": s, "short": by_slug[s]["short"], "file": f"{s}.safetensors"} for s in LORAS]}))
    cfg = load_profile("standin", {**tiny_overrides(tiny_root), "catalog": str(tmp / "catalog.yaml"),
                                "lora_dir": str(loras), "runs_dir": str(tmp / "runs"), "device": "cpu"})
    params = dict(stage_params, sets=["variety"], max_images=3, batch_size=2, threads=1, workers=2)
    local = synthesize(cfg, params, tmp / "local", pipe=tiny_pipe, progress=False)
    ray_tmp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        res = run_in_netns(SCRIPT, {"cfg": cfg, "params": params, "arm": str(tmp / "arm"), "ray_tmp": ray_tmp,
                                    "dirs": {n: str(tmp / n) for n in ("plain", "killed", "faults")}}, tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (tmp / "result.json").write_text(json.dumps(res, indent=1))  # timings and placement, for a failing assert
    return {"tmp": tmp, "local": local, "cfg": cfg, "params": params, **res}


def test_ray_actors_make_the_same_files_and_manifest_as_a_local_run(ray_runs):
    tmp = ray_runs["tmp"]
    ref = _files(tmp / "local")
    assert sum(k.endswith(".png") for k in ref) == len(LORAS) * 3
    assert _files(tmp / "plain") == ref  # every PNG, params.json and manifest.json, byte for byte
    run = ray_runs["runs"]["plain"]
    assert run["manifest"] == ray_runs["local"]
    stats = run["stats"]
    assert stats["device"] == "cpu" and stats["workers"] == 2 and stats["threads"] == 1
    assert len({a["pid"] for a in stats["actors"]}) == 2 and all(a["threads"] == 1 for a in stats["actors"])
    assert {s: (j["status"], j["images"], j["attempts"]) for s, j in stats["jobs"].items()} == {
        s: ("ok", 3, 1) for s in LORAS}
    # both actors pulled jobs
    assert len({j["pid"] for j in stats["jobs"].values()}) == 2


def test_sigkilled_worker_job_runs_again_and_nothing_is_lost_or_duplicated(ray_runs):
    tmp = ray_runs["tmp"]
    fired = ray_runs["fired_pid"]
    run = ray_runs["runs"]["killed"]
    stats = run["stats"]
    assert fired in {a["pid"] for a in stats["actors"]}  # a worker process really died mid-job
    first = {a["pid"] for a in stats["actors"]}
    assert {s: (j["status"], j["attempts"]) for s, j in stats["jobs"].items()} == {s: ("ok", 1) for s in LORAS}
    # The killed job finished on the restarted process (Ray's retry, not a resubmission), redoing
    # only the batch that the dead process left undone; the other jobs made all 3 images.
    redone = [s for s, j in stats["jobs"].items() if j["images"] != 3]
    assert len(redone) == 1 and stats["jobs"][redone[0]]["images"] == 1
    assert stats["jobs"][redone[0]]["pid"] not in first
    assert _files(tmp / "killed") == _files(tmp / "local")  # no image lost, none extra, no temporary left
    assert run["manifest"] == ray_runs["local"]


def test_a_refused_lora_and_a_crashing_job_are_reported_once_and_the_rest_finish(ray_runs):
    """LoraError comes back as a value (not retried); a job's own error is not retried either; the
    other LoRAs' images are made, and no manifest is written (a rerun resumes)."""
    f = ray_runs["faults"]
    assert f["error"] == "RestyleFailed"
    assert f["refused"] == {"anime": "anime.safetensors: diffusers applied 1 of 2 modules in the file (test)"}
    assert f["failed"] == {"disco": "RuntimeError: boom (test)"}
    assert sorted(f["loads"]) == ["anime", "disco", "pop_art"]  # each loaded once: nothing retried
    assert f["stats"]["jobs"]["pop_art"]["status"] == "ok"
    faults, local = ray_runs["tmp"] / "faults", ray_runs["tmp"] / "local"
    made = {k: v for k, v in _files(faults).items() if k.endswith(".png")}
    assert sorted(made) == sorted(k for k in _files(local) if "/pop_art/" in k)
    assert all(_files(local)[k] == v for k, v in made.items())
    assert not (faults / "manifest.json").exists()


def test_a_finished_folder_needs_no_ray_and_bad_engine_arguments_are_refused(ray_runs, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a run with nothing to do")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg, params, local = ray_runs["cfg"], ray_runs["params"], ray_runs["tmp"] / "local"
    before = _files(local)
    assert synthesize(cfg, params, local, progress=False, engine="ray") == ray_runs["local"]
    assert _files(local) == before
    with pytest.raises(ValueError, match="engine must be one of local, ray, not 'dask'"):
        synthesize(cfg, params, local, progress=False, engine="dask")
    with pytest.raises(ValueError, match="names a Ray cluster; it needs engine='ray'"):
        synthesize(cfg, params, local, progress=False, address="auto")
