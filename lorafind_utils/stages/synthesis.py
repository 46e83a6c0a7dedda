"""Stage 01: restyle base images with SD1.5 + ControlNet-Canny + each LoRA (the paper's F sets).

Output (``<runs_dir>/synth``, see :mod:`lorafind_utils.core.layout`): ``params.json``, one PNG per
(set, LoRA, base image) at ``<set>/<lora>/<image>.png``, and ``manifest.json`` (parameters +
every item (file, seed) + skipped inputs).

Writes are atomic (temporary file + rename), so a killed run leaves no
half-written PNG, and a rerun skips finished images: a resumed run ends with
exactly the files and manifest of an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from lorafind_utils.core import layout
from lorafind_utils.core.files import run_lock, write_json_atomic
from lorafind_utils.core.images import read_base_set
from lorafind_utils.engines.local import job_threads, resolve_workers, run_jobs, torch_threads
from lorafind_utils.models.loras import check_lora_against_model, inspect_lora
from lorafind_utils.models.pipelines import (
    SCHEDULER,
    base_skeletons,
    cached_pipeline,
    check_denoising_steps,
    load_pipeline,
    pick_device,
    prepare_loras,
)
from lorafind_utils.models.restyle import (
    SYNTH_KEYS,
    Prepared,
    batches,
    finished,
    item_seed,
    prepare_base_images,
    restyle_with_lora,
)


def _restyle_job(job: tuple) -> int:
    """A worker's job: one LoRA's images, on a pipeline loaded once per worker process."""
    cfg, params, out_dir, entry, chunks = job
    return restyle_with_lora(cached_pipeline(cfg, params["dtype"]), entry, chunks, params, out_dir)


ENGINES = ("local", "ray")


def synthesize(cfg: dict, params: dict, out_dir: str | Path | None = None, pipe=None, progress: bool = True,
               workers=None, engine: str = "local", address: str | None = None) -> dict:
    """Make the F sets: every (LoRA, set, base image) restyled once. Resumable.

    :param cfg: the profile (models, catalog, base-image sets).
    :param params: stage parameters (see ``configs/tiny.yaml`` ``01_synthesize``).
    :param out_dir: output folder (default ``<runs_dir>/synth``).
    :param pipe: an already-loaded pipeline (else loaded from the profile).
    :param workers: processes restyling at once on CPU, one LoRA each (default: ``params["workers"]``,
        or 1 when ``pipe`` is given, which is then used here; ``auto``: cores / ``params["threads"]``);
        always 1 on a GPU. Every job runs with ``params["threads"]`` torch threads, so the images
        do not depend on the number of workers. The folder is locked while it is written: a second
        writer is refused (:class:`~lorafind_utils.core.files.RunLocked`), naming the first.
    :param engine: ``local`` (this machine: in-process or worker processes) or ``ray`` (the same jobs on
        Ray actors, see :mod:`lorafind_utils.engines.ray_cluster`: one per GPU, or ``workers`` CPU actors; ``pipe``
        is then used for the checks only). Both write the same files and manifest, byte for byte.
    :param address: ``ray`` only: ``auto`` or ``HOST:PORT`` of a running Ray cluster (default:
        ``$RAY_ADDRESS``, else a new local Ray instance); on a cluster, ``out_dir`` must be on a
        filesystem every node shares.
    :return: the manifest (also written to ``<out_dir>/manifest.json``).
    :raises LoraError: a LoRA that cannot load, before any image is made (``ray``: a LoRA that fails
        only when diffusers loads it is reported after the other LoRAs' images are made,
        :class:`~lorafind_utils.engines.ray_cluster.LorasRefused`; a failed job:
        :class:`~lorafind_utils.engines.ray_cluster.RestyleFailed`).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if address and engine != "ray":
        raise ValueError(f"address={address!r} names a Ray cluster; it needs engine='ray'")
    out_dir = Path(out_dir) if out_dir else layout.synth_dir(cfg)
    with run_lock(out_dir, "stage 01 (synthesize)"):
        return _synthesize(cfg, params, out_dir, pipe, progress, workers, engine, address)


def _synthesize(cfg: dict, params: dict, out_dir: Path, pipe, progress: bool, workers, engine: str = "local",
                address: str | None = None) -> dict:
    check_denoising_steps(params["steps"], params["strength"], "stage 01")
    catalog = prepare_loras(cfg)
    given_pipe = pipe is not None
    # Every LoRA is checked against the base model before the first image is made (on the
    # models' skeletons: the pipeline is loaded only where it restyles, here or in workers).
    unet, text_encoder = (pipe.unet, pipe.text_encoder) if given_pipe else base_skeletons(cfg)
    infos = {}
    for e in catalog:
        info = inspect_lora(e["path"])
        check_lora_against_model(info, unet, text_encoder)
        infos[e["slug"]] = info
    del unet, text_encoder
    run_params = {k: params[k] for k in SYNTH_KEYS if k in params}
    run_params.update(
        sets=list(params["sets"]), max_images=int(params["max_images"]), prompt="",
        base_model=cfg["models"]["base"], controlnet=cfg["models"]["controlnet"], lora_weight=1.0,
        loras=[e["slug"] for e in catalog],
        scheduler=type(pipe.scheduler).__name__ if given_pipe else SCHEDULER,
        # CPU: torch threads per job. Another count sums in another order, and the random tiny
        # UNet can amplify that into visible differences, so it is a parameter of the images.
        threads=int(params["threads"]),
        # Likewise the batch: a batched UNet call may sum in another order than a smaller one
        # (measured: up to 19/255 between batch 1 and 8 on one CPU, 1/255 on another).
        batch_size=int(params["batch_size"]),
    )
    pfile = layout.synth_params_file(out_dir)
    if pfile.exists():
        old = json.loads(pfile.read_text())
        if old != run_params:
            diff = sorted(k for k in set(old) | set(run_params) if old.get(k) != run_params.get(k))
            raise ValueError(
                f"{out_dir} holds images made with other parameters ({', '.join(diff)}); "
                "delete it or choose another runs_dir"
            )

    sets: dict[str, list[Prepared]] = {}
    skipped: list[dict] = []
    for name in params["sets"]:
        imgs = read_base_set(layout.base_set_dir(cfg, name))
        n = int(params["max_images"])
        if n:
            imgs = imgs[:n]
        ok, bad = prepare_base_images(
            imgs, int(params["resolution"]), int(params["canny_low"]), int(params["canny_high"])
        )
        sets[name] = ok
        skipped += [dict(b, set=name) for b in bad]
    # Everything is checked: only now does the folder get its parameters (a failed start leaves none).
    if not pfile.exists():
        write_json_atomic(run_params, pfile, sort_keys=True)

    items, todo, redone = [], {}, 0  # LoRA -> its batches with an image still to make
    for e in catalog:
        mine = []
        for name, prepared in sets.items():
            for x in prepared:
                rel = layout.synth_rel(name, e["slug"], x.image.id)
                s = item_seed(int(params["seed"]), e["slug"], x.image.id)
                items.append({"set": name, "lora": e["slug"], "image": x.image.id, "file": rel, "seed": s})
                mine.append((x, rel, s))
        pending = []
        for chunk in batches(mine, params["batch_size"]):
            missing = [t for t in chunk if not finished(out_dir / t[1])]
            redone += sum((out_dir / t[1]).exists() for t in missing)  # broken files found and redone
            if missing:
                pending.append(chunk)
        if pending:
            todo[e["slug"]] = pending
    if redone:
        print(f"{redone} unreadable images in {out_dir} (truncated or damaged) are made again")
    entries = {e["slug"]: e for e in catalog}
    if engine == "ray":  # the same jobs on Ray actors, which write the same files; the manifest is written here
        from lorafind_utils.engines.ray_cluster import run_ray

        run_ray(cfg, params, out_dir, [(entries[slug], chunks) for slug, chunks in todo.items()], restyle_with_lora,
                finished, workers=params["workers"] if workers is None else workers, threads=run_params["threads"],
                address=address, progress=progress)
    else:  # this machine: in this process, or one LoRA per worker process
        device = str(pick_device(cfg["device"]))
        threads = job_threads(device, run_params["threads"])
        if workers is None:
            workers = 1 if given_pipe else params["workers"]
        workers = resolve_workers(workers, device, len(todo), threads)
        total = sum(len(c) for chunks in todo.values() for c in chunks)
        bar = tqdm(total=total, desc=f"restyling ({workers} workers)" if workers > 1 else "restyling",
                   unit="img", disable=not progress)
        if workers == 1:
            if todo and pipe is None:
                pipe = load_pipeline(cfg, cfg["device"], params["dtype"])
            with torch_threads(threads):
                for slug, chunks in todo.items():
                    restyle_with_lora(pipe, entries[slug], chunks, params, out_dir, on_batch=bar.update)
        else:  # one job per LoRA; each worker loads the pipeline once and uses the same thread count
            jobs = [(cfg, params, out_dir, entries[slug], chunks) for slug, chunks in todo.items()]
            run_jobs(_restyle_job, jobs, workers=workers, threads=threads, on_done=lambda i, n: bar.update(n))
        bar.close()
    manifest = {
        "params": run_params,
        "loras": [
            {"slug": e["slug"], "short": e["short"], "file": Path(e["path"]).name, "layout": infos[e["slug"]].layout,
             "rank": infos[e["slug"]].rank}
            for e in catalog
        ],
        "sets": {k: [x.image.id for x in v] for k, v in sets.items()},
        "items": items,
        "skipped": skipped,
    }
    write_json_atomic(manifest, layout.synth_manifest(out_dir), sort_keys=True)
    return manifest
