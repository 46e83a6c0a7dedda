"""The ``lorafind`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from lorafind_utils.core.files import RunLocked

USER_ERRORS = (ValueError, FileNotFoundError, OSError, RunLocked)


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _profile_arg(p):
    p.add_argument("--profile", default="tiny", help="tiny (default, CPU, offline) | paper | path to a profile YAML")
    p.add_argument("--runs-dir", help="override the profile's runs_dir (outputs)")


def _overrides(args) -> dict:
    o = {}
    if getattr(args, "runs_dir", None):
        o["runs_dir"] = args.runs_dir
    if getattr(args, "figures_dir", None):
        o["figures_dir"] = args.figures_dir
    return o


def cmd_study(args):
    if args.dry_run:
        from lorafind_utils import dryrun

        if args.profile != "paper":
            raise ValueError("--dry-run runs the paper profile's code path on CPU; use it with --profile paper")
        argv = (["--smoke"] if args.smoke else []) + (["--keep-models"] if args.keep_models else [])
        argv += (["--only", *args.only] if args.only else []) + (
            ["--from", getattr(args, "from")] if getattr(args, "from") else []
        )
        code = dryrun.main(argv)
        if code:
            raise SystemExit(code)
        return
    if args.smoke or args.keep_models:
        raise ValueError("--smoke and --keep-models belong to --dry-run")
    from lorafind_utils.engines.runner import run_study

    run_study(args.profile, only=args.only, start=getattr(args, "from"), overrides=_overrides(args))


def _stage_args(args, stage: str, keys: tuple[str, ...]) -> tuple[dict, dict, str]:
    """The profile, the stage's parameters with the command line's values over them, and where they came from."""
    from lorafind_utils.core.config import load_profile, stage_params

    cfg = load_profile(args.profile, _overrides(args))
    p = stage_params(cfg, stage)
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    p.update(given)
    source = f"profile {args.profile}" + (f" + command line ({', '.join(given)})" if given else "")
    return cfg, p, source


def _agg():
    import matplotlib

    matplotlib.use("Agg")


def cmd_synthesize(args):
    _agg()
    from lorafind_utils import stages

    cfg, p, source = _stage_args(args, "01_synthesize", ("sets", "max_images"))
    try:
        res = stages.synthesize(cfg, p, source, engine=args.engine, address=args.address)
    except RuntimeError as e:  # ray_engine.RestyleFailed: jobs failed; the others finished, a rerun resumes
        if type(e).__name__ != "RestyleFailed":
            raise
        raise ValueError(str(e)) from None
    for f in res["figures"]:
        print(f"grid: {f}")


def cmd_train(args):
    _agg()
    from lorafind_utils import stages

    cfg, p, source = _stage_args(args, "02_finetune", ("epochs", "n_train", "train_set"))
    res = stages.finetune(cfg, p, source)
    print(res["table"].to_string(index=False))
    print(f"artifacts: {res['out_dir']}; figures: {', '.join(map(str, res['figures']))}")


def cmd_stage(args):
    _agg()
    from lorafind_utils import stages

    name = stages.stage_name(args.stage)
    cfg, p, source = _stage_args(args, name, ())
    res = stages.run(name, cfg, p, source)
    print("figures: " + ", ".join(map(str, res.get("figures", []))))


def cmd_lora_check(args):
    from lorafind_utils.core.config import load_profile
    from lorafind_utils.models.loras import check_lora_against_model, inspect_lora
    from lorafind_utils.models.pipelines import base_skeletons, quiet_libraries

    quiet_libraries()
    cfg = load_profile(args.profile)
    info = inspect_lora(args.file)
    unet, te = base_skeletons(cfg)  # names and shapes only: no weights are read
    touched = check_lora_against_model(info, unet, te)
    print(f"OK  {info.summary()}")
    print(
        f"    loads onto {cfg['models']['base']}: {touched['unet']} UNet modules, "
        f"{touched['text_encoder']} text-encoder modules"
    )


def cmd_train_lora(args):
    _agg()
    from lorafind_utils import stages

    cfg, p, source = _stage_args(args, "07_train_style_lora", ("style_dir", "style_name", "caption_template", "ranks",
                                                             "steps", "lr", "alpha", "batch_size", "seed"))
    res = stages.train_style_lora(cfg, p, source)
    print(f"LoRAs (diffusers + kohya layouts) and catalog: {res['catalog']}")


def cmd_fetch(args):
    from lorafind_utils.catalog.fetch import fetch
    from lorafind_utils.core.config import load_profile

    fetch(load_profile(args.profile, _overrides(args)), what=args.only)


def cmd_rank(args):
    from lorafind_utils.core.config import load_profile
    from lorafind_utils.core.images import ImageError

    cfg = load_profile(args.profile, _overrides(args))
    if args.method == "index":
        from lorafind_utils.rank.index_ops import IndexRanker

        ranker = IndexRanker.from_profile(cfg)
        ranker.top_k = args.top  # a faiss search for the K best, not a sort of the whole catalog
    else:
        from lorafind_utils.rank.classifier_ranker import Ranker

        ranker = Ranker.from_profile(cfg, args.run)
    results, failed = [], 0
    for r in ranker.rank_files(args.images):  # one batch; an unreadable file is reported, not fatal
        if isinstance(r, ImageError):
            print(f"lorafind: error: {r}", file=sys.stderr)
            failed += 1
        else:
            results.append(r)
    k = args.top or len(ranker.slugs)
    if args.json:
        print(json.dumps([r.as_dict(k) for r in results], indent=2))
    else:
        for r in results:
            print(f"\n{r.query}  ({ranker.backbone})")
            if r.match is not None:
                print(f"  {r.verdict()}")
            print(f"  {'rank':>4}  {'LoRA':<22} {'score':>7}")
            for i, (_slug, name, score) in enumerate(r.top(k), 1):
                bar = "#" * round(30 * max(score, 0))
                shown = f"{100 * score:6.2f}%" if r.method == "classifier" else f"{score:7.3f}"
                print(f"  {i:>4}  {name:<22} {shown}  {bar}")
    if failed:
        raise SystemExit(2)


def cmd_catalog_import(args):
    from lorafind_utils.catalog.bulk_import import import_catalog
    from lorafind_utils.core.config import load_profile, stage_params

    cfg = load_profile(args.profile, _overrides(args))
    p = stage_params(cfg, "01_synthesize")
    if args.sets:
        p["sets"] = args.sets
    if args.max_images is not None:
        p["max_images"] = args.max_images
    s = import_catalog(cfg, args.source, args.out, params=p, restyle=not args.no_restyle, engine=args.engine,
                       address=args.address, workers=args.workers)
    if s["failed"]:
        raise SystemExit(1)  # retryable failures: rerun the same command


def cmd_index(args):
    from lorafind_utils.core.config import load_profile
    from lorafind_utils.rank import index_ops as indexing

    cfg = load_profile(args.profile, _overrides(args))
    if args.index_cmd == "build":
        _agg()
        indexing.build(cfg)
    elif args.index_cmd == "add":
        if args.thumbnails:
            if not args.name:
                raise ValueError("--thumbnails needs --name (the LoRA's name in the index)")
            indexing.add_thumbnails(cfg, args.thumbnails, args.name, replace=args.replace)
        else:
            if not args.file:
                raise ValueError("give a LoRA file (or --thumbnails DIR --name NAME)")
            indexing.add_lora(cfg, args.file, n_images=args.images, name=args.name, replace=args.replace)
    elif args.index_cmd == "remove":
        indexing.remove(cfg, args.name)
    else:
        r = indexing.IndexRanker.from_profile(cfg)
        ix = r.index
        print(f"{r.folder}: {len(ix)} LoRAs; encoder {ix.encoder.get('name')} ({ix.dim}-d), {ix.variant} entries")
        for n in ix.names():
            m = ix.entry(n).meta
            print(f"  {n:<24} {m.get('source', ''):<12} {m.get('n_images', '')} images")


def cmd_style(args):
    from lorafind_utils.core import styles

    if args.style_cmd == "list":
        rows = styles.list_styles()
        if args.json:
            print(json.dumps([{"style": r["style"], "lora": r["lora"]} for r in rows], indent=2))
        else:
            for r in rows:
                print(f"{r['style']:<20} {r['lora']:<18} {r['description']}")
    else:
        for out in styles.apply_to_files(args.name, args.images, args.out):
            print(out)


def cmd_generate(args):
    from lorafind_utils.core.config import load_profile, stage_params
    from lorafind_utils.models.pipelines import load_pipeline
    from lorafind_utils.stages.generation import generate, prepare_base, resolve_lora

    cfg = load_profile(args.profile, _overrides(args))
    p = stage_params(cfg, "01_synthesize")
    lora = resolve_lora(cfg, args.lora)
    base = prepare_base(args.image, int(p["resolution"]), int(p["canny_low"]), int(p["canny_high"]))
    pipe = load_pipeline(cfg, cfg["device"], p["dtype"])
    im = generate(pipe, lora, base, args.seed, p, prompt=args.prompt or "")
    from pathlib import Path

    out = Path(args.out or f"{Path(args.image).stem}_{lora['slug']}_s{args.seed}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    print(f"{out}  ({lora['short']}, base {args.image}, seed {args.seed}, prompt {args.prompt or '(none)'!r})")


def cmd_bench(args):
    from lorafind_utils.bench.speed import bench_rank, bench_synth, bench_train, bench_workers
    from lorafind_utils.core.config import load_profile

    cfg = load_profile(args.profile, _overrides(args))
    if args.bench_cmd == "index":
        from lorafind_utils.bench.index_scale import bench_index, write_bench_table
        from lorafind_utils.core import layout

        rows = []
        for dim in args.dims:
            rows += bench_index(
                args.sizes, dim, args.queries, 10, args.kinds, build_threads=1, max_bytes=args.max_gb * 1e9
            )
        csv_path, md = write_bench_table(rows, layout.figure(cfg, "index_bench"))
        print(open(md).read())
        print(f"wrote {csv_path} and {md}")
        return
    if args.bench_cmd == "rank":
        res = bench_rank(cfg, n_queries=args.images)
    elif args.bench_cmd == "train":
        res = bench_train(cfg, n_images=args.images, epochs=args.epochs, backbone=args.backbone)
    elif args.bench_cmd == "workers":
        res = bench_workers(
            cfg, runs=args.runs, n=args.n, epochs=args.epochs, images=args.images, parts=tuple(args.only)
        )
    else:
        res = bench_synth(cfg, n_images=args.images, n_loras=args.loras, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res))


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run the study's notebooks headlessly with papermill")
    _profile_arg(p)
    p.add_argument("--only", nargs="+", help="run only these stages, e.g. --only 01")
    p.add_argument("--from", help="start at this stage, e.g. --from 02")
    p.add_argument("--figures-dir", help="override the profile's figures_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="with --profile paper: its code path and settings at full size on CPU, seeded random weights, "
                        "counts cut (runs/dryrun/, ~1 h on 2 cores; same as `make dryrun`)")
    p.add_argument("--smoke", action="store_true", help="with --dry-run: the smallest counts")
    p.add_argument(
        "--keep-models", action="store_true", help="with --dry-run: keep the ~8 GB of random models for the next run"
    )
    p.set_defaults(func=cmd_study)


def _add_synthesize(sub) -> None:
    p = sub.add_parser("synthesize", help="stage 01: restyle the base images with every LoRA")
    _profile_arg(p)
    p.add_argument("--sets", nargs="+", help="base-image sets (default: the profile's)")
    p.add_argument("--max-images", type=int, help="first N images of each set (0 = all)")
    p.add_argument("--figures-dir", help="override the profile's figures_dir")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine; ray: Ray actors, one per GPU (or CPU actors)")
    p.add_argument("--address", help="with --engine ray: auto or HOST:PORT of a running Ray cluster "
                   "(default: $RAY_ADDRESS, else a new local Ray instance)")
    p.set_defaults(func=cmd_synthesize)


def _add_catalog(sub) -> None:
    p = sub.add_parser("catalog", help="LoRA catalogs at scale")
    csub = p.add_subparsers(dest="catalog_cmd", required=True)
    c = csub.add_parser("import", help="fetch, check and restyle many LoRAs; resumable, one status file per LoRA")
    c.add_argument("source", help="folder of .safetensors files, or YAML/JSON list of Civitai model-version ids")
    _profile_arg(c)
    c.add_argument("--out", help="the import's folder (default: <runs_dir>/imports/<source name>)")
    c.add_argument("--no-restyle", action="store_true", help="fetch and check only")
    c.add_argument("--engine", choices=["local", "ray"], default="local")
    c.add_argument("--address", help="with --engine ray: auto or HOST:PORT")
    c.add_argument("--workers", type=lambda v: v if v == "auto" else _positive(v))
    c.add_argument("--sets", nargs="+")
    c.add_argument("--max-images", type=int)
    c.set_defaults(func=cmd_catalog_import)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="stage 02: fine-tune the classifier and evaluate the baselines")
    _profile_arg(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--n-train", type=int, help="training base images per class (0 = all)")
    p.add_argument("--train-set", help="restyled set to train on (default: the profile's)")
    p.add_argument("--figures-dir", help="override the profile's figures_dir")
    p.set_defaults(func=cmd_train)


def _add_stage(sub) -> None:
    p = sub.add_parser("stage", help="run one stage of the study without Jupyter (what its notebook runs)")
    p.add_argument("stage", help="stage number or name, e.g. 03 or 03_ablate_sizes")
    _profile_arg(p)
    p.add_argument("--figures-dir", help="override the profile's figures_dir")
    p.set_defaults(func=cmd_stage)


def _add_train_lora(sub) -> None:
    p = sub.add_parser("train-lora", help="train a style LoRA per rank from a folder of images, and score them")
    _profile_arg(p)
    p.add_argument("--style-dir", help="folder of style images (+ captions.csv / captions.jsonl)")
    p.add_argument("--style-name", help="the style's name (captions, catalog)")
    p.add_argument("--caption-template", help='used without a captions file, e.g. "{name}, in the style of {style}"')
    p.add_argument("--ranks", type=int, nargs="+")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--figures-dir", help="override the profile's figures_dir")
    p.set_defaults(func=cmd_train_lora)


def _add_fetch(sub) -> None:
    p = sub.add_parser(
        "fetch", help="download the profile's models, LoRAs (Civitai; token from CIVITAI_TOKEN) and weights"
    )
    _profile_arg(p)
    p.add_argument("--only", action="append", choices=["models", "loras", "resnet50", "thumbnails"],
                   help="fetch only this (repeatable); default: what the profile needs")
    p.set_defaults(func=cmd_fetch)


def _add_rank(sub) -> None:
    p = sub.add_parser("rank", help="rank the catalog's LoRAs for style images (needs stage 02's classifier)")
    _profile_arg(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=_positive, help="show the K best (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--run", help="classifier run under runs/<profile>/train/ (default: stage 02's)")
    p.add_argument("--method", choices=["classifier", "index"], default="classifier",
                   help="classifier: stage 02's (the paper's method); index: the style-embedding index (stage 08), "
                        "which also says when no LoRA of the catalog paints like the image")
    p.set_defaults(func=cmd_rank)


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index", help="the style-embedding LoRA index (stage 08): build, add a LoRA without retraining, remove"
    )
    isub = p.add_subparsers(dest="index_cmd", required=True)
    c = isub.add_parser("build", help="train the style encoder if needed, build and calibrate the index")
    _profile_arg(c)
    c.set_defaults(func=cmd_index)
    c = isub.add_parser(
        "add", help="add a LoRA file (restyles N base images, embeds, adds) or one known by its previews"
    )
    _profile_arg(c)
    c.add_argument("file", nargs="?", help="a LoRA .safetensors (checked as `lorafind lora check` does)")
    c.add_argument(
        "--images", type=_positive, help="base images to restyle with it (default: the profile's add_images)"
    )
    c.add_argument("--thumbnails", help="instead of a file: a folder of the LoRA's preview images (no synthesis)")
    c.add_argument("--name", help="its name in the index (default: the file's stem)")
    c.add_argument("--replace", action="store_true", help="replace an entry of the same name")
    c.set_defaults(func=cmd_index)
    c = isub.add_parser("remove", help="remove a LoRA from the index")
    _profile_arg(c)
    c.add_argument("name")
    c.set_defaults(func=cmd_index)
    c = isub.add_parser("list", help="the LoRAs in the index")
    _profile_arg(c)
    c.set_defaults(func=cmd_index)


def _add_style(sub) -> None:
    p = sub.add_parser("style", help="the tiny world's named styles (image operations)")
    ssub = p.add_subparsers(dest="style_cmd", required=True)
    c = ssub.add_parser("list", help="each style and the catalog LoRA trained on it")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_style)
    c = ssub.add_parser("apply", help="apply a style to images; writes <stem>.png into --out")
    c.add_argument("name", help="style name (e.g. 'pixel art') or LoRA slug (e.g. pixel_art)")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_style)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="restyle a base image with one LoRA (stage 01's settings)")
    _profile_arg(p)
    p.add_argument("--lora", required=True, help="catalog slug or name, or a .safetensors file")
    p.add_argument("--image", required=True, help="base image")
    p.add_argument("--prompt", help="optional prompt (default: none, as in the study)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output PNG (default: <image>_<lora>_s<seed>.png)")
    p.set_defaults(func=cmd_generate)


def _add_lora(sub) -> None:
    p = sub.add_parser("lora", help="LoRA file tools")
    lsub = p.add_subparsers(dest="lora_cmd", required=True)
    c = lsub.add_parser("check", help="will this file load onto the profile's base model? (never unpickles)")
    c.add_argument("file")
    c.add_argument("--profile", default="tiny")
    c.set_defaults(func=cmd_lora_check)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline in the same run)")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    b = bsub.add_parser("synth", help="stage-01 pipeline vs a naive loop")
    _profile_arg(b)
    b.add_argument("--images", type=int, default=8)
    b.add_argument("--loras", type=int, default=3)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("index", help="faiss index types at catalog sizes: build time, memory, latency, recall@10")
    _profile_arg(b)
    b.add_argument("--sizes", type=_positive, nargs="+", default=[1_000, 10_000, 100_000])
    b.add_argument("--dims", type=_positive, nargs="+", default=[128, 512])
    b.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"], choices=["flat", "hnsw", "ivf"])
    b.add_argument("--queries", type=_positive, default=200)
    b.add_argument("--max-gb", type=float, default=4.0, help="skip sizes whose vectors and indexes would exceed this")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("rank", help="ranking latency per query and batch throughput (needs stage 02)")
    _profile_arg(b)
    b.add_argument("--images", type=int, default=64, help="queries in the batch")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser("train", help="stage-02 data pipeline vs an ImageFolder + PIL loop (needs stage 01)")
    _profile_arg(b)
    b.add_argument("--images", type=int, default=384)
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--backbone", help="classifier backbone (default: the profile's), e.g. resnet50")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    b = bsub.add_parser(
        "workers", help="worker processes vs one process on every core (stages 01, 03/04; needs stage 01)"
    )
    _profile_arg(b)
    b.add_argument("--runs", type=int, default=4, help="ablation runs to train")
    b.add_argument("--n", type=int, default=70, help="base images per class in each run")
    b.add_argument("--epochs", type=int, default=5)
    b.add_argument("--images", type=int, default=64, help="base images restyled by every LoRA (0: the whole set)")
    b.add_argument("--only", nargs="+", choices=["train", "synth"], default=["train", "synth"])
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)


#: one small parser per command, in the order ``lorafind --help`` lists them
COMMANDS = (_add_study, _add_synthesize, _add_catalog, _add_train, _add_stage, _add_train_lora, _add_fetch, _add_rank,
            _add_index, _add_style, _add_generate, _add_lora, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lorafind", description="Find the LoRAs that paint in an image's style; reproduce the study."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lorafind_utils.engines.runner import StageFailed

    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `lorafind rank … | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (StageFailed, *USER_ERRORS) as e:
        print(f"lorafind: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafind: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
