#!/usr/bin/env python3
"""Train the tiny world (scripts/tiny_world.py): a codec, a denoiser, a ControlNet-Canny and 12 style LoRAs
on real photos, then evaluate them and write the preview grid, the catalog and data/tiny_world/record.json.

Seeded and resumable: every part checkpoints under runs/tiny_world_train/<part>/ (every 100-200 steps), a
rerun continues where a killed run stopped and skips finished parts (delete runs/tiny_world_train/<part> to
retrain one). Two torch threads by default (both cores of the 2-core machine the shipped world was trained on,
about 1.7 h in all); run it niced on a shared machine:

    nice -n 5 .venv/bin/python scripts/train_tiny_world.py                 # everything
    nice -n 5 .venv/bin/python scripts/train_tiny_world.py --only loras preview
    nice -n 5 .venv/bin/python scripts/train_tiny_world.py --only loras --slugs anime disco

On a GPU (the parts' batches are still drawn on the CPU from the seeded generators, so a part stopped on
one device resumes on the other), with any part's settings overridden (they become part of the
checkpoint's signature, so a changed setting refuses to resume an old checkpoint):

    .venv/bin/python scripts/train_tiny_world.py --device cuda --set denoiser.steps=40000 denoiser.batch_size=256

Parts, in order (each needs the ones before): codec, denoiser (writes data/tiny_world/sd15), controlnet
(writes data/tiny_world/controlnet-canny), strength_probe (bridge LoRAs for a few styles at 0.3/0.5/0.7: which
strength stage 01 uses, tiny_world.STRENGTH), loras (data/tiny_world/loras + catalog.yaml), preview (evaluation,
data/tiny_world/synthesis_preview.png). record.json is rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("codec", "denoiser", "controlnet", "strength_probe", "loras", "preview")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=PARTS, help="parts to run (default: all, finished ones are skipped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slugs", nargs="+", help="loras: train only these LoRA slugs")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads (default 2: both cores of the 2-core machine it was trained on)")
    ap.add_argument("--device", default="cpu", help="torch device for training and evaluation (default cpu)")
    ap.add_argument("--set", nargs="+", default=[], metavar="PART.KEY=VALUE",
                    help="override a part's setting, e.g. codec.batch_size=64 denoiser.steps=40000 loras.rank=16")
    ap.add_argument("--strength", type=float, default=None, help="preview: the img2img strength evaluated in full "
                    "(default tiny_world.STRENGTH)")
    ap.add_argument("--probe", action="store_true", help="preview: also run tiny_world.retrieval_probe (a linear probe "
                    "of what Table 3 can reach; a few minutes)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        overrides = parse_overrides(a.set)
    except ValueError as e:
        ap.error(str(e))

    import cv2
    import torch

    torch.set_num_threads(a.threads)
    cv2.setNumThreads(1)
    import tiny_world as tw

    from lorafind_utils.core.files import write_json_atomic
    from lorafind_utils.models.pipelines import quiet_libraries

    quiet_libraries()
    progress = not a.no_progress
    parts = a.only or PARTS
    tw.RUN_DIR.mkdir(parents=True, exist_ok=True)
    wall = {}

    def done(part: str) -> dict | None:
        f = tw.RUN_DIR / part / "result.json"
        return json.loads(f.read_text()) if f.exists() else None

    for part in PARTS:
        if part not in parts:
            continue
        t0 = time.perf_counter()
        if part == "codec" and not done("codec"):
            tw.train_codec(a.seed, progress=progress, device=a.device, settings=overrides["codec"])
        elif part == "denoiser" and not done("denoiser"):
            tw.train_denoiser(a.seed, progress=progress, device=a.device, settings=overrides["denoiser"])
        elif part == "controlnet" and not done("controlnet"):
            tw.train_controlnet(a.seed, progress=progress, device=a.device, settings=overrides["controlnet"])
        elif part == "strength_probe" and not done("strength_probe"):
            tw.strength_probe(a.seed, progress=progress, device=a.device)
        elif part == "loras":
            from lorafind_utils.core.styles import STYLES

            todo = [s.lora for s in STYLES.values() if (a.slugs is None or s.lora in a.slugs)
                    and not (tw.RUN_DIR / "loras" / s.lora / "result.json").exists()]
            if todo:
                tw.train_loras(a.seed, slugs=todo, progress=progress, settings=overrides["loras"], device=a.device)
            results = {s.lora: json.loads((tw.RUN_DIR / "loras" / s.lora / "result.json").read_text())
                       for s in STYLES.values() if (tw.RUN_DIR / "loras" / s.lora / "result.json").exists()}
            if len(results) == len(STYLES):
                tw.write_catalog(results)
        elif part == "preview":
            res = tw.evaluate(a.seed, progress=progress, device=a.device, strength=a.strength, probe=a.probe)
            res["seconds"] = time.perf_counter() - t0
            write_json_atomic(res, tw.RUN_DIR / "preview" / "result.json")
        wall[part] = time.perf_counter() - t0
        print(f"{part}: {wall[part]:.0f} s this run", flush=True)

    write_record(tw, a.threads)
    return 0


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["codec.batch_size=64", ...]`` -> {"codec": {"batch_size": "64"}, ...}, every key and value checked
    against the part's settings (``tiny_world._settings``) before anything trains."""
    import tiny_world as tw

    defaults = {"codec": tw.CODEC, "denoiser": tw.DENOISER, "controlnet": tw.CONTROLNET, "loras": tw.LORA}
    out: dict[str, dict] = {part: {} for part in defaults}
    for item in items:
        key, sep, value = item.partition("=")
        part, dot, name = key.partition(".")
        if not sep or not dot or part not in out or not name:
            raise ValueError(f"--set {item!r}: expected PART.KEY=VALUE with PART one of {', '.join(out)}")
        out[part][name] = value
    for part, values in out.items():
        try:
            tw._settings(defaults[part], values, None)
        except ValueError as e:
            raise ValueError(f"--set {part}: {e}") from None
    return out


def write_record(tw, threads: int) -> None:
    """data/tiny_world/record.json: per part its steps, training time, final metrics; sha256 of every shipped file."""
    from lorafind_utils.core.files import write_json_atomic
    from lorafind_utils.core.styles import STYLES

    def load(p: Path):
        return json.loads(p.read_text()) if p.exists() else None

    rec: dict = {"resolution": tw.RESOLUTION, "strength": tw.STRENGTH, "steps": tw.STEPS, "canny": list(tw.CANNY),
                 "base_model": tw.BASE_MODEL, "configs": {"vae": tw.VAE_CONFIG, "unet": tw.UNET_CONFIG,
                                                          "controlnet_conditioning_channels": tw.CN_COND_CHANNELS,
                                                          "text_encoder": tw.TEXT_CONFIG},
                 "threads": threads}
    for part in ("codec", "denoiser", "controlnet", "strength_probe"):
        r = load(tw.RUN_DIR / part / "result.json")
        rec[part] = r
    rec["loras"] = {s.lora: load(tw.RUN_DIR / "loras" / s.lora / "result.json") for s in STYLES.values()}
    ev = load(tw.RUN_DIR / "preview" / "result.json")
    if ev:
        rec["strength"] = ev.get("strength", tw.STRENGTH)
        rec["evaluation"] = ev
        rs = ev["recognition"]
        for slug, r in rec["loras"].items():
            if r:
                r["recognition_rate"] = rs["per_style"].get(slug)
                r["centroid_recognition_rate"] = rs["centroid_per_style"].get(slug)
    rec["train_seconds"] = {p: (rec[p] or {}).get("seconds") for p in ("codec", "denoiser", "controlnet")}
    rec["train_seconds"]["loras"] = sum((r or {}).get("wall_seconds", 0) for r in rec["loras"].values())
    rec["train_seconds"]["preview"] = (ev or {}).get("seconds")
    files = tw.shipped_files()
    rec["files"] = {str(p.relative_to(tw.REPO)): {"sha256": tw.sha256(p), "bytes": p.stat().st_size} for p in files}
    rec["shipped_mb"] = round(sum(p.stat().st_size for p in files) / 2**20, 2)
    write_json_atomic(rec, tw.RECORD, default=str)


if __name__ == "__main__":
    sys.exit(main())
