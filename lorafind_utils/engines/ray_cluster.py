"""Stage 01 on a Ray cluster: the same jobs as :func:`lorafind_utils.stages.synthesis.synthesize` runs
locally (one job = one LoRA's pending fixed batches), restyled by long-lived Ray actors.

* **Actors.** One actor per GPU (``num_gpus=1``) when the cluster has GPUs and the profile's
  device is ``auto``/``cuda``; otherwise CPU actors, ``workers`` of them, each reserving
  ``params["threads"]`` CPUs and running torch with exactly that many threads (a parameter of the
  images, as locally). Each actor loads the pipeline once (:func:`~lorafind_utils.models.pipelines.cached_pipeline`)
  and restyles job after job, swapping LoRAs with :func:`~lorafind_utils.models.restyle.restyle_with_lora`.
  The base images are decoded and edge-detected once, on the driver, and put in the object store
  once; jobs carry only (image index, file, seed) triples.
* **Dispatch.** A ``ray.wait`` loop: every idle actor pulls the next job, so a slow LoRA never holds
  up a fast actor.
* **Outputs.** The actors write each PNG atomically into the same ``out_dir`` layout (on a cluster,
  a filesystem shared by every node); the driver writes the manifest, after checking that every
  image is there. A job re-checks its batches before it starts and skips the finished ones, so a
  retried job redoes only what its dead attempt did not finish, and the files are byte for byte
  those of a local run (same batches, same seeds, same thread count).
* **Retries.** A worker process that dies (killed, out of memory, node lost) is restarted by Ray
  (``max_restarts``) and its job retried on the new process (``max_task_retries``), which Ray may
  place on another node. An actor that has used up its restarts is dropped and its job resubmitted
  to another actor (at most ``retries`` times per job).
* **Failures.** A LoRA that diffusers cannot load (:class:`~lorafind_utils.models.loras.LoraError`) is a bad
  file, not a crash: the actor catches it and returns it as a value -- it is reported, never retried.
  Any other error raised by a job is reported and not retried either (Ray's default for application
  errors). The other jobs always run to the end; then :class:`LorasRefused` (only refusals) or
  :class:`RestyleFailed` names every LoRA that did not finish, and no manifest is written, so a rerun
  resumes.

Ray is imported only here, and only when a job runs on it.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

from lorafind_utils.models.loras import LoraError

#: attempts Ray makes per actor: restarts of a dead actor process, and retries of its in-flight job
MAX_RESTARTS = 3
#: resubmissions of a job to another actor after its actor died for good
JOB_RETRIES = 2

#: timings and placement of the last :func:`run_ray` call (for benchmarks and logs)
last_stats: dict = {}


class LorasRefused(LoraError):
    """LoRAs that could not be loaded onto the pipeline (``refused``: {slug: message}); the other
    LoRAs' images were made."""

    def __init__(self, refused: dict[str, str]):
        self.refused = dict(refused)
        super().__init__(f"{len(refused)} LoRAs could not be loaded (their images were not made; the other "
                         f"LoRAs' were):\n  " + "\n  ".join(f"{k}: {v}" for k, v in refused.items()))


class RestyleFailed(RuntimeError):
    """Jobs that failed (``failed``: {slug: error}), beside any refused LoRAs (``refused``); the other
    LoRAs' images were made and a rerun resumes."""

    def __init__(self, failed: dict[str, str], refused: dict[str, str] | None = None):
        self.failed, self.refused = dict(failed), dict(refused or {})
        lines = [f"{k}: failed: {v}" for k, v in self.failed.items()] + [
            f"{k}: refused: {v}" for k, v in self.refused.items()
        ]
        super().__init__(f"{len(self.failed) + len(self.refused)} LoRAs were not restyled (the other LoRAs' images "
                         f"were made; rerun to resume):\n  " + "\n  ".join(lines))


def _absolute_cfg(cfg: dict) -> dict:
    """The profile with its model folders and LoRA folder made absolute: an actor's working directory
    (and, on a cluster, its machine) is not the driver's. Hub ids stay as they are."""
    from lorafind_utils.core.config import resolve

    cfg = copy.deepcopy(cfg)
    m = cfg["models"]
    for role in ("base", "controlnet", "loras"):
        if role not in m:
            continue
        p = resolve(m[role])
        if m.get("kind") == "standin" or p.exists():
            m[role] = str(p)
    for key in ("lora_dir", "runs_dir"):
        if key in cfg:
            cfg[key] = str(resolve(cfg[key]))
    return cfg


class RestyleWorker:
    """A Ray actor (wrapped with ``ray.remote`` when used): loads the pipeline once, then restyles job
    after job, one LoRA each. Defined at module level so that Ray ships it by reference."""

    def __init__(self, cfg: dict, params: dict, threads: int | None, images: list, restyle_with_lora, finished):
        import torch

        from lorafind_utils.models.pipelines import quiet_libraries

        if threads:
            torch.set_num_threads(int(threads))
        quiet_libraries()
        self.cfg, self.params, self.images = cfg, params, images
        self.restyle_with_lora, self.finished = restyle_with_lora, finished

    def _pipe(self):
        from lorafind_utils.models.pipelines import cached_pipeline

        return cached_pipeline(self.cfg, self.params["dtype"])

    def ready(self) -> dict:
        """Load the pipeline now; where, and how long it took."""
        import ray
        import torch

        t = time.perf_counter()
        pipe = self._pipe()
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(pipe.device),
                "threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - t, 3)}

    def run(self, entry: dict, chunks: list, out_dir: str) -> dict:
        """Restyle one LoRA's batches [[(image index, file, seed), ...], ...], skipping the finished ones
        (a retried job redoes only what its dead attempt left undone).

        :return: {"status": "ok", "images": n written, ...} or, for a LoRA that cannot load,
            {"status": "refused", "error": message}: returned, not raised, so that it is never retried.
        """
        out = Path(out_dir)
        todo = [[(self.images[i], rel, seed) for i, rel, seed in c] for c in chunks
                if not all(self.finished(out / rel) for _, rel, _ in c)]
        t = time.perf_counter()
        try:
            n = self.restyle_with_lora(self._pipe(), entry, todo, self.params, out) if todo else 0
        except LoraError as e:
            return {"status": "refused", "error": str(e), "pid": os.getpid()}
        return {"status": "ok", "images": n, "pid": os.getpid(), "seconds": round(time.perf_counter() - t, 3)}


def _plan(cfg: dict, workers, threads: int, n_jobs: int) -> tuple[str, int]:
    """(``cpu`` | ``cuda``, number of actors) from the connected cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    want = str(cfg["device"])
    explicit = None if workers in (None, 0, "auto") else int(workers)
    if explicit is not None and explicit < 1:
        raise ValueError(f"workers must be >= 1 or 'auto', got {workers!r}")
    if want != "cpu" and gpus:
        return "cuda", max(1, min(explicit or gpus, gpus, n_jobs))
    if want.startswith("cuda"):
        raise ValueError(f"the profile's device is {want}, but the Ray cluster has no GPU "
                         f"(resources: {res}); set device: auto or cpu, or add GPU nodes")
    fit = max(1, cpus // max(1, threads))  # more would wait for CPUs the cluster does not have
    return "cpu", max(1, min(explicit or fit, fit, n_jobs))


def _connect(address: str | None, workers, threads: int, n_jobs: int, device: str) -> bool:
    """Connect to Ray (``address``, else ``$RAY_ADDRESS``, else a new local instance); True if this
    call started it (and must shut it down). An already connected session is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS") or None
    kw = dict(include_dashboard=False, log_to_driver=True)
    if addr:
        ray.init(address=addr, **kw)
    else:
        from lorafind_utils.engines.local import resolve_workers

        if device.startswith("cpu"):
            n = resolve_workers(workers, "cpu", n_jobs, threads)
            kw["num_cpus"] = n * max(1, threads)
        ray.init(address="local", **kw)  # a fresh local instance, never a stray cluster on this machine
    return True


def run_ray(cfg: dict, params: dict, out_dir: str | Path, jobs: list[tuple[dict, list[list]]], restyle_with_lora,
            finished, workers=None, threads: int | None = None, address: str | None = None, progress: bool = True,
            retries: int = JOB_RETRIES, max_restarts: int = MAX_RESTARTS) -> dict:
    """Run stage 01's jobs on Ray (see the module's doc).

    :param jobs: [(catalog entry, batches [[(Prepared, file, seed), ...], ...]), ...], one per LoRA.
    :param restyle_with_lora: stage 01's job, ``f(pipe, entry, batches, params, out_dir) -> images made``
        (a module-level function: Ray sends it to the actors by name).
    :param finished: ``f(path) -> bool``, an image that is complete (a retried job skips those batches).
    :param workers: CPU actors (``auto``/None: the cluster's CPUs / ``threads``); with GPUs, at most one
        actor per GPU (an integer caps the count).
    :param threads: torch threads per actor (``params["threads"]``).
    :param address: ``auto`` or ``HOST:PORT`` of a running cluster; None: ``$RAY_ADDRESS`` or a new
        local instance. A session already connected (``ray.init`` called by the caller) is used as is.
    :param retries: resubmissions of a job to another actor once its actor has died for good.
    :param max_restarts: restarts of a dead actor process (and retries of its in-flight job).
    :return: stats (also in :data:`last_stats`): timings, actors, per-LoRA results.
    :raises LorasRefused: LoRAs that cannot load (the rest were made).
    :raises RestyleFailed: jobs that failed (the rest were made).
    """
    global last_stats
    out_dir = Path(out_dir).resolve()
    threads = int(threads or params.get("threads") or 1)
    stats: dict = {"jobs": {}, "actors": []}
    last_stats = stats
    if not jobs:
        return stats
    import ray
    from ray.exceptions import RayError, RayTaskError
    from tqdm.auto import tqdm

    from lorafind_utils.models.pipelines import profile_device

    t0 = time.perf_counter()
    local_device = profile_device(cfg) if not (address or os.environ.get("RAY_ADDRESS")) else "cpu"
    started = _connect(address, workers, threads, len(jobs), local_device)
    stats["init_s"] = round(time.perf_counter() - t0, 3)
    actors: list = []
    try:
        device, n_actors = _plan(cfg, workers, threads, len(jobs))
        acfg = dict(_absolute_cfg(cfg), device=device)
        # Every base image once into the object store; jobs name them by index.
        index: dict[int, int] = {}
        images: list = []
        specs = []
        for entry, chunks in jobs:
            spec = []
            for chunk in chunks:
                c = []
                for prep, rel, seed in chunk:
                    if id(prep) not in index:
                        index[id(prep)] = len(images)
                        images.append(prep)
                    c.append((index[id(prep)], rel, int(seed)))
                spec.append(c)
            specs.append((dict(entry), spec, sum(len(c) for c in spec)))
        images_ref = ray.put(images)
        opts = dict(max_restarts=max_restarts, max_task_retries=max_restarts)
        if device == "cuda":
            opts.update(num_gpus=1, num_cpus=1)
        else:
            opts.update(num_cpus=threads)
        Worker = ray.remote(RestyleWorker)
        t1 = time.perf_counter()
        actors = [Worker.options(**opts).remote(acfg, params, threads, images_ref, restyle_with_lora, finished)
                  for _ in range(n_actors)]
        stats["actors"] = ray.get([a.ready.remote() for a in actors])  # a model that cannot load fails here
        stats["ready_s"] = round(time.perf_counter() - t1, 3)
        stats.update(device=device, workers=n_actors, threads=threads)

        total = sum(n for _, _, n in specs)
        bar = tqdm(total=len(specs), unit="LoRA", disable=not progress,
                   desc=f"restyling on Ray ({n_actors} {'GPU' if device == 'cuda' else 'CPU'} actors)")
        done_images = 0
        queue = list(range(len(specs)))
        attempts = [0] * len(specs)
        idle = list(actors)
        running: dict = {}  # ObjectRef -> (job index, actor)
        refused: dict[str, str] = {}
        failed: dict[str, str] = {}
        t2 = time.perf_counter()
        while queue or running:
            while queue and idle:
                j = queue.pop(0)
                actor = idle.pop(0)
                entry, spec, _ = specs[j]
                attempts[j] += 1
                running[actor.run.remote(entry, spec, str(out_dir))] = (j, actor)
            if not running:  # jobs left, but no actor alive
                for j in queue:
                    failed[specs[j][0]["slug"]] = "no Ray actor left to run it (every actor died)"
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            j, actor = running.pop(ref)
            slug = specs[j][0]["slug"]
            try:
                res = ray.get(ref)
            except RayTaskError as e:  # the job raised: a bug or a bad input, reported and not retried
                cause = e.cause if getattr(e, "cause", None) is not None else e
                res = {"status": "failed", "error": f"{type(cause).__name__}: {cause}"}
                idle.append(actor)
            except RayError as e:  # the actor died for good (its restarts used up): run the job elsewhere
                try:
                    ray.kill(actor)
                except Exception:
                    pass
                if attempts[j] <= retries:
                    queue.append(j)
                    continue
                res = {"status": "failed", "error": f"{type(e).__name__}: its worker died ({attempts[j]} actors tried)"}
            else:
                idle.append(actor)
            if res["status"] == "refused":
                refused[slug] = res["error"]
            elif res["status"] == "failed":
                failed[slug] = res["error"]
            else:
                done_images += specs[j][2]
            stats["jobs"][slug] = dict(res, attempts=attempts[j])
            bar.update(1)
            bar.set_postfix_str(f"{done_images}/{total} images")
        bar.close()
        stats["jobs_s"] = round(time.perf_counter() - t2, 3)
    except BaseException:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started:
            ray.shutdown()
        raise
    for a in actors:
        ray.kill(a)
    if started:
        ray.shutdown()
    _remove_stale_temporaries(out_dir)
    if progress:
        print(f"ray: connected in {stats['init_s']:.1f} s, {stats['workers']} actors ready (pipeline loaded) in "
              f"{stats['ready_s']:.1f} s, {len(specs)} LoRAs in {stats['jobs_s']:.1f} s", file=sys.stderr)
    if failed:
        raise RestyleFailed(failed, refused)
    if refused:
        raise LorasRefused(refused)
    missing = [rel for _, spec, _ in specs for c in spec for _, rel, _ in c if not (out_dir / rel).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images the Ray workers wrote are not in {out_dir} on this machine "
                           f"(e.g. {missing[0]}): on a cluster, runs_dir must be on a filesystem that every node "
                           "shares at the same path")
    return stats


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of writes that a killed worker never finished (``.<name>.<pid>.<rand>.tmp``,
    see :func:`~lorafind_utils.core.files.atomic_path`). The folder is locked and every actor is gone,
    so none of them is still being written."""
    for p in out_dir.rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
