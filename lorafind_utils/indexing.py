"""Stage 08: rank LoRAs by style embedding -- add a LoRA without retraining, say "none of these".

A LoRA's entry is one unit vector (:mod:`lorafind_utils.style_index`, faiss, exact inner product):

* ``prototype``: the normalised mean of the embeddings of images it painted (CSD's prototypes);
* ``content_cancelled``: the normalised mean of (embedding of a restyled image - embedding of
  its base photo) -- the LoRA as a direction away from the photo (CARLoS). A query has no base
  photo, so it is compared as (query - mean embedding of the base photos).

Adding a LoRA restyles a few base images with it, embeds them and adds one vector: no training.
A LoRA known only by its preview images is added from them (``source: thumbnails``).

"None of these": the top-1 cosine is calibrated into P(the catalog has the query's LoRA) by a
logistic regression fitted on validation data: stage-01 images of the validation base images,
scored once against the full index (their LoRA is in it) and once against the index without
their LoRA (leave-one-LoRA-out: a style the catalog does not have). The threshold is P = 0.5.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .config import load_catalog, stage_params
from .style_index import StyleIndex

STAGE = "08_index"


def _p(cfg: dict) -> dict:
    return stage_params(cfg, STAGE)


def _p02(cfg: dict) -> dict:
    return stage_params(cfg, "02_finetune")


# --- data ---------------------------------------------------------------------------------------

@dataclass
class StyleData:
    """Stage 01's restyled images (uint8), their LoRA labels and base ids, the split and base photos."""

    data: object  # classifier.ImageSet
    classes: list[str]
    train_ids: list[str]
    val_ids: list[str]
    base_photos: dict  # base id -> uint8 [3, S, S] (the unstyled photo)


def load_style_data(cfg: dict, image_size: int | None = None) -> StyleData:
    """The stage-01 images of stage 02's training set, split as stage 02 splits them."""
    from .classifier import group_split
    from .finetune import cached_set
    from .images import load_rgb, read_base_set, square_resize

    p02 = _p02(cfg)
    size = int(image_size or p02["image_size"])
    classes = [e["slug"] for e in load_catalog(cfg)]
    data = cached_set(layout.synth_dir(cfg), p02["train_set"], classes, size)
    train_ids, val_ids = group_split(data.groups, float(p02["val_fraction"]), int(p02["split_seed"]))
    import torch

    photos = {}
    for b in read_base_set(layout.base_set_dir(cfg, p02["train_set"])):
        if b.id in set(data.groups):
            im = square_resize(load_rgb(b.path), size)
            photos[b.id] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return StyleData(data, classes, train_ids, val_ids, photos)


# --- encoders -----------------------------------------------------------------------------------

def make_encoder(cfg: dict, kind: str, sd: StyleData | None = None, seed: int = 0, classes: list[str] | None = None,
                 folder: Path | None = None, progress: bool = True):
    """The encoder ``kind`` for this profile; a ``trained`` one is loaded from ``folder`` or trained
    (on ``classes``' images of the training base images) and saved there."""
    from .models import profile_device
    from .style_encoder import clip_encoder, load_trained, train_encoder, training_free

    p, p02 = _p(cfg), _p02(cfg)
    device = profile_device(cfg)
    if kind in ("imagenet", "gram"):
        return training_free(kind, p02["backbone"], p02["weights"], int(p02["image_size"]), device)
    if kind.startswith("clip:"):
        return clip_encoder(kind[5:], int(p02["image_size"]), device)
    if kind != "trained":
        raise ValueError(f"unknown encoder '{kind}' (trained | imagenet | gram | clip:<hub id or folder>)")
    folder = Path(folder or layout.encoder_dir(cfg, f"{p['run_name']}_s{seed}"))
    if (folder / "encoder.json").exists():
        return load_trained(folder, device)
    sd = sd or load_style_data(cfg)
    keep = set(classes or sd.classes)
    rows = [i for i, y in enumerate(sd.data.y.tolist()) if sd.classes[y] in keep]
    sub = sd.data.subset(rows)
    # labels renumbered 0..k-1 for the loss; only which images share a LoRA matters
    import torch

    remap = {c: i for i, c in enumerate(sorted({sd.classes[y] for y in sub.y.tolist()}))}
    sub.y = torch.tensor([remap[sd.classes[y]] for y in sub.y.tolist()])
    enc, history = train_encoder(sub, sd.train_ids, p02["backbone"], p02["weights"], int(p02["image_size"]),
                                 embed_dim=p["embed_dim"], hidden=p["hidden"], epochs=p["epochs"], lr=p["lr"],
                                 bases_per_batch=p["bases_per_batch"], temperature=p["temperature"], seed=seed,
                                 device=device, progress=progress)
    enc.extra["trained_on"] = sorted(keep)
    enc.extra["history"] = history
    enc.save(folder)
    return enc


# --- entries and queries ------------------------------------------------------------------------

def photo_centroid(encoder, sd: StyleData, ids: list[str], embedded: "Embedded | None" = None) -> np.ndarray:
    """Mean embedding of the unstyled base photos (the content a query's style is measured from)."""
    import torch

    if embedded is not None:
        return np.stack([embedded.photos[i] for i in ids if i in embedded.photos]).mean(0)
    x = torch.stack([sd.base_photos[i] for i in ids if i in sd.base_photos])
    return encoder.embed(x).mean(0)


def entry_vector(z: np.ndarray, variant: str, z_base: np.ndarray | None = None) -> np.ndarray:
    """One entry vector from the embeddings ``z`` of a LoRA's images; ``z_base``: of their base photos."""
    if variant == "content_cancelled":
        if z_base is None:
            raise ValueError("content-cancelled entries need the base photos of the LoRA's images")
        d = z - z_base
        z = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)
    v = z.mean(0)
    return v / (np.linalg.norm(v) + 1e-12)


def lora_vectors(encoder, x, variant: str, base_x=None) -> np.ndarray:
    """One entry vector from a LoRA's images (uint8 [N, 3, S, S]); ``base_x``: their base photos."""
    z_base = encoder.embed(base_x) if variant == "content_cancelled" and base_x is not None else None
    return entry_vector(encoder.embed(x), variant, z_base)


def queries_as(z: np.ndarray, variant: str, centroid: np.ndarray | None) -> np.ndarray:
    """Query embeddings in the entries' space (content-cancelled: minus the photo centroid)."""
    if variant == "content_cancelled":
        z = z - centroid[None, :]
        z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
    return z


@dataclass
class Embedded:
    """One encoder's embeddings of a :class:`StyleData`: every stage-01 image (rows of ``sd.data``) and every
    base photo, computed once and shared by every index built from them."""
    images: np.ndarray
    photos: dict[str, np.ndarray]


def embed_style_data(encoder, sd: StyleData) -> Embedded:
    import torch

    ids = sorted(sd.base_photos)
    zp = encoder.embed(torch.stack([sd.base_photos[i] for i in ids])) if ids else np.zeros((0, encoder.dim), np.float32)
    return Embedded(encoder.embed(sd.data.x), dict(zip(ids, zp)))


def build_index(encoder, sd: StyleData, variant: str, catalog: list[dict], ids: list[str] | None = None,
                classes: list[str] | None = None, embedded: Embedded | None = None) -> StyleIndex:
    """An index with one entry per LoRA from its stage-01 images of the base images ``ids``
    (default: stage 02's training split). ``embedded``: this encoder's embeddings of ``sd``
    (:func:`embed_style_data`), to build several indexes without embedding again."""
    ids = set(ids or sd.train_ids)
    emb = embedded or embed_style_data(encoder, sd)
    short = {e["slug"]: e for e in catalog}
    index = StyleIndex.create(encoder.dim, encoder.describe(), kind="auto", variant=variant)
    for k, slug in enumerate(sd.classes):
        if classes is not None and slug not in classes:
            continue
        rows = [i for i, (y, g) in enumerate(zip(sd.data.y.tolist(), sd.data.groups)) if y == k and g in ids]
        z_base = np.stack([emb.photos[sd.data.groups[i]] for i in rows]) if variant == "content_cancelled" else None
        index.add(slug, entry_vector(emb.images[rows], variant, z_base),
                  {"short": short[slug]["short"], "file": Path(short[slug]["path"]).name, "source": "synthesized",
                   "n_images": len(rows), "sha256": short[slug].get("sha256") or ""})
    if variant == "content_cancelled":
        index.params["photo_centroid"] = photo_centroid(encoder, sd, sorted(ids), emb).astype(float).round(6).tolist()
    return index


def _centroid(index: StyleIndex) -> np.ndarray | None:
    c = index.params.get("photo_centroid")
    return np.asarray(c, np.float32) if c is not None else None


def search_vectors(index: StyleIndex, z: np.ndarray, k: int | None = None) -> list[list[tuple[str, float]]]:
    return index.search(queries_as(z, index.variant, _centroid(index)), k or len(index))


# --- "none of these" ---------------------------------------------------------------------------

def _features(scores: list[list[tuple[str, float]]]) -> np.ndarray:
    s1 = np.array([r[0][1] for r in scores])
    s2 = np.array([r[1][1] if len(r) > 1 else -1.0 for r in scores])
    return np.stack([s1, s1 - s2], axis=1)


def calibrate(index: StyleIndex, z_val: np.ndarray, y_val: list[str]) -> dict:
    """Fit P(match) on validation images (known: full index; unknown: leave their LoRA out) and
    store it in the index's parameters. Returns the calibration record (with its validation AUROC)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    full = search_vectors(index, z_val)
    known = _features(full)
    # the same query against the index without its own LoRA: its ranking minus that entry
    held = [[(n, s) for n, s in r if n != y] for r, y in zip(full, y_val)]
    unknown = _features(held)
    x = np.concatenate([known, unknown])
    t = np.concatenate([np.ones(len(known)), np.zeros(len(unknown))])
    lr = LogisticRegression(class_weight="balanced").fit(x, t)
    p = lr.predict_proba(x)[:, 1]
    rec = {"score": "top-1 cosine and its margin over the 2nd", "coef": lr.coef_[0].round(6).tolist(),
           "intercept": round(float(lr.intercept_[0]), 6), "threshold_p": 0.5,
           "validation": {"queries": int(len(known)), "auroc": round(float(roc_auc_score(t, p)), 4),
                          "how": "stage-01 images of the validation base images; unknown = the same image with its "
                                 "own LoRA left out of the index"}}
    index.params["calibration"] = rec
    return rec


def match_probability(index: StyleIndex, scores: list[list[tuple[str, float]]]) -> np.ndarray:
    """P(the catalog has the query's LoRA) per query (0.5 when the index was never calibrated)."""
    cal = index.params.get("calibration")
    if not cal or not scores:
        return np.full(len(scores), 0.5)
    z = _features(scores) @ np.asarray(cal["coef"]) + cal["intercept"]
    return 1 / (1 + np.exp(-z))


# --- ranking ------------------------------------------------------------------------------------

class IndexRanker:
    """Ranks the index's LoRAs for query images; the index is re-read when it changes on disk, so a
    LoRA added by ``lorafind index add`` is seen by the next query (the widget included)."""

    def __init__(self, cfg: dict, encoder, folder: Path):
        self.cfg, self.encoder, self.folder = cfg, encoder, Path(folder)
        self._index, self._stamp = None, None
        self.backbone = f"style index ({encoder.kind} encoder)"

    @classmethod
    def from_profile(cls, cfg: dict) -> "IndexRanker":
        p = _p(cfg)
        folder = layout.index_dir(cfg, p["encoder"], p["variant"])
        if not (folder / "index.json").exists():
            raise FileNotFoundError(f"no LoRA index in {folder}: build it first (`lorafind index build --profile "
                                    f"{cfg['name']}` or notebook 08_index)")
        enc = _load_trained_for(cfg, p) if p["encoder"] == "trained" else make_encoder(cfg, p["encoder"], progress=False)
        return cls(cfg, enc, folder)

    @property
    def index(self) -> StyleIndex:
        """The index for reading (cached; re-read when index.json changes). Never modify and save
        it: a writer starts from :meth:`read_fresh` under :func:`index_lock`."""
        stamp = _stamp(self.folder / "index.json")
        if self._index is None or stamp != self._stamp:
            self._index = self.read_fresh()
            self._stamp = stamp
        return self._index

    def read_fresh(self) -> StyleIndex:
        """The index as it is on disk now (a new object, not the cached copy)."""
        return StyleIndex.load(self.folder, expect_encoder=self.encoder.describe(), profile=self.cfg["name"])

    @property
    def slugs(self) -> list[str]:
        return self.index.names()

    def rank_files(self, paths: list, names: list[str] | None = None) -> list:
        """One :class:`~lorafind_utils.retrieval.Ranking` (with ``match``) or ImageError per path."""
        z, errors = self.encoder.embed_files(paths)
        return self._rankings(z, errors, [str(p) for p in paths] if names is None else names)

    def rank_images(self, images, names: list[str]) -> list:
        return self._rankings(self.encoder.embed_images(images), [None] * len(images), names)

    def rank(self, images: list, names: list[str] | None = None) -> list:
        """Rank PIL images (as :meth:`lorafind_utils.retrieval.Ranker.rank` does)."""
        return self.rank_images(images, names or [f"image {i}" for i in range(len(images))])

    def _rankings(self, z, errors, names) -> list:
        from .retrieval import Ranking

        index = self.index
        scores = search_vectors(index, z) if len(z) else []
        probs = match_probability(index, scores)
        out, j = [], 0
        for name, err in zip(names, errors):
            if err is not None:
                out.append(err)
                continue
            r = scores[j]
            out.append(Ranking(name, [n for n, _ in r], [index.entry(n).meta.get("short", n) for n, _ in r],
                               [float(s) for _, s in r], match=bool(probs[j] >= 0.5), match_p=float(probs[j]),
                               method="index"))
            j += 1
        return out


def _stamp(path: Path):
    """What changes whenever a save replaces ``path`` (each save writes a new file: a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size


def _load_trained_for(cfg: dict, p: dict):
    from .models import profile_device
    from .style_encoder import load_trained

    return load_trained(layout.encoder_dir(cfg, f"{p['run_name']}_s{p['seeds'][0]}"), profile_device(cfg))


# --- building, adding, removing -----------------------------------------------------------------

INDEX_WAIT_S = 120.0
"""How long an ``index add``/``remove``/``build`` waits for another one writing the same index before
it is refused (with a message naming the holder)."""


@contextmanager
def index_lock(folder: str | Path, what: str = "the index"):
    """The lock every writer of an index folder holds from its *read* to its save (a read before
    it would let a second writer save a stale copy over the first one's change): the project's
    :func:`~lorafind_utils.files.run_lock`, waiting up to :data:`INDEX_WAIT_S` for its turn."""
    from .files import run_lock

    with run_lock(folder, what, wait=INDEX_WAIT_S):
        yield


def build(cfg: dict, progress: bool = True, log=print) -> dict:
    """Build the profile's index (encoder + variant of stage 08's parameters), calibrated, saved.

    Holds :func:`index_lock` throughout: an ``index add`` started meanwhile waits and lands on the
    new index (or is refused naming the build), never on the old one just before it is replaced."""
    p = _p(cfg)
    with index_lock(layout.index_dir(cfg, p["encoder"], p["variant"]), "index build"):
        return _build(cfg, p, progress, log)


def _build(cfg: dict, p: dict, progress: bool, log) -> dict:
    sd = load_style_data(cfg)
    enc = make_encoder(cfg, p["encoder"], sd, seed=p["seeds"][0], progress=progress)
    index = build_index(enc, sd, p["variant"], load_catalog(cfg))
    val = [i for i, g in enumerate(sd.data.groups) if g in set(sd.val_ids)]
    cal = calibrate(index, enc.embed(sd.data.x[val]), [sd.classes[y] for y in sd.data.y[val].tolist()])
    folder = index.save(layout.index_dir(cfg, p["encoder"], p["variant"]))
    log(f"index {folder}: {len(index)} LoRAs, encoder {enc.kind} ({enc.dim}-d), {p['variant']} entries; "
        f"'none of these' calibrated on {cal['validation']['queries']} validation images (AUROC "
        f"{cal['validation']['auroc']:.3f})")
    return {"index": index, "encoder": enc, "folder": folder, "calibration": cal}


def _open(cfg: dict):
    """A ranker and a first look at its index (to fail early); writers re-read under :func:`index_lock`."""
    r = IndexRanker.from_profile(cfg)
    return r, r.index


def _exists_error(slug: str, folder: Path):
    from .style_index import IndexEntryExists

    return IndexEntryExists(f"'{slug}' is already in the index {folder}; pass --replace to replace it")


def add_lora(cfg: dict, file: str | Path, n_images: int | None = None, name: str | None = None,
             replace: bool = False, progress: bool = True, log=print, ranker: "IndexRanker | None" = None) -> dict:
    """Add a LoRA file: check it (as ``lorafind lora check``), restyle ``n_images`` base images with
    it (stage 01's settings, pipeline and seeds), embed, add one entry, save -- no training.

    :raises LoraError: a file ``lora check`` refuses (the index is unchanged).
    :raises IndexEntryExists: the name exists and ``replace`` is not set.
    """
    import torch

    from .config import SLUG
    from .images import read_base_set
    from .loras import check_lora_against_model, inspect_lora, load_lora
    from .models import base_skeletons, cached_pipeline
    from .synthesis import batches, item_seed, prepare_base_images, restyle

    t0 = time.perf_counter()
    p, p01 = _p(cfg), stage_params(cfg, "01_synthesize")
    file = Path(file)
    slug = name or file.stem
    if not SLUG.fullmatch(slug):
        raise ValueError(f"'{slug}' is not a usable LoRA name (letters, digits, '.', '_', '-'); pass --name")
    info = inspect_lora(file)
    check_lora_against_model(info, *base_skeletons(cfg))  # the same checks and messages as `lora check`
    ranker, index = (ranker, ranker.index) if ranker is not None else _open(cfg)
    if slug in index and not replace:
        raise _exists_error(slug, ranker.folder)  # early; checked again under the lock
    n = int(n_images or p["add_images"])
    bases = read_base_set(layout.base_set_dir(cfg, _p02(cfg)["train_set"]))[:n]
    prepared, _ = prepare_base_images(bases, int(p01["resolution"]), int(p01["canny_low"]), int(p01["canny_high"]))
    items = [(x, None, item_seed(int(p01["seed"]), slug, x.image.id)) for x in prepared]
    pipe = cached_pipeline(cfg, p01["dtype"])
    load_lora(pipe, file, "lorafind_add", weight=1.0)
    ims = []
    try:
        for chunk in batches(items, p01["batch_size"]):
            ims += restyle(pipe, [t[0] for t in chunk], [t[2] for t in chunk], p01)
    finally:
        pipe.unload_lora_weights()
    t_restyle = time.perf_counter() - t0
    enc = ranker.encoder
    x = torch.stack([torch.from_numpy(np.asarray(im.resize((enc.image_size,) * 2)).copy()).permute(2, 0, 1)
                     for im in ims])
    base_x = torch.stack([torch.from_numpy(np.asarray(b.init.resize((enc.image_size,) * 2)).copy()).permute(2, 0, 1)
                          for b in prepared]) if index.variant == "content_cancelled" else None
    vec = lora_vectors(enc, x, index.variant, base_x)
    from .download import sha256_file

    meta = {"short": slug, "file": file.name, "source": "synthesized", "n_images": len(ims),
            "sha256": sha256_file(file), "layout": info.layout}
    with index_lock(ranker.folder):  # read, add, save: all under the lock (another add may have landed)
        index = ranker.read_fresh()
        if slug in index and not replace:
            raise _exists_error(slug, ranker.folder)
        index.add(slug, vec, meta, replace=replace)
        index.save(ranker.folder)
    secs = time.perf_counter() - t0
    log(f"added {slug} ({info.layout}, {len(ims)} restyled images) to {ranker.folder} in {secs:.1f} s "
        f"(restyling {t_restyle:.1f} s); {len(index)} LoRAs")
    return {"name": slug, "seconds": secs, "restyle_seconds": t_restyle, "images": len(ims), "entries": len(index)}


def add_thumbnails(cfg: dict, folder: str | Path, name: str, replace: bool = False, log=print) -> dict:
    """Add a LoRA known only by its preview images (no synthesis): the mean of their embeddings.

    Content-cancelled indexes measure previews from the photo centroid, as they measure queries."""
    from .config import SLUG
    from .images import IMAGE_SUFFIXES

    if not SLUG.fullmatch(name or ""):
        raise ValueError(f"'{name}' is not a usable LoRA name (letters, digits, '.', '_', '-')")
    files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no preview images")
    ranker, index = _open(cfg)
    if name in index and not replace:
        raise _exists_error(name, ranker.folder)  # early; checked again under the lock
    z_raw, errors = ranker.encoder.embed_files(files)
    bad = [str(e) for e in errors if e is not None]
    if not len(z_raw):
        raise ValueError(f"{folder}: no readable preview images ({'; '.join(bad)})")
    with index_lock(ranker.folder):  # read, add, save: all under the lock (another add may have landed)
        index = ranker.read_fresh()
        if name in index and not replace:
            raise _exists_error(name, ranker.folder)
        z = queries_as(z_raw, index.variant, _centroid(index))
        v = z.mean(0)
        index.add(name, v / (np.linalg.norm(v) + 1e-12), {"short": name, "file": "", "source": "thumbnails",
                                                            "n_images": int(len(z))}, replace=replace)
        index.save(ranker.folder)
    log(f"added {name} from {len(z)} preview images" + (f" ({len(bad)} unreadable: {'; '.join(bad)})" if bad else ""))
    return {"name": name, "images": int(len(z)), "skipped": bad, "entries": len(index)}


def remove(cfg: dict, name: str, log=print) -> dict:
    ranker = IndexRanker.from_profile(cfg)
    with index_lock(ranker.folder):  # read, remove, save: all under the lock
        index = ranker.read_fresh()
        index.remove(name)
        index.save(ranker.folder)
    log(f"removed {name}; {len(index)} LoRAs left in {ranker.folder}")
    return {"name": name, "entries": len(index)}


# --- stage 08: measured against the classifier --------------------------------------------------

def table3_queries(cfg: dict) -> tuple[list[dict], dict]:
    """Stage 05's queries (file, correct LoRA, how) and the classifier's metrics on them."""
    import json

    f = layout.rankings_file(cfg)
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: run stage 05 (05_retrieve_thumbnails) first; stage 08 uses its queries")
    r = json.loads(f.read_text())
    return r["queries"], r["metrics"]


def _ranks(index: StyleIndex, z: np.ndarray, truth: list[str]) -> list[int]:
    res = search_vectors(index, z)
    return [[n for n, _ in r].index(t) + 1 if t in [n for n, _ in r] else len(index) + 1 for r, t in zip(res, truth)]


def _summary(rows: list[dict], keys=("top1", "top3", "top6", "mrr")) -> dict:
    out = {}
    for k in keys:
        v = np.array([100 * r[k] for r in rows], float)
        out[f"{k}_mean"], out[f"{k}_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    out["runs"] = len(rows)
    return out


def _fmt(m: float, sd: float) -> str:
    return f"{m:.1f}" if sd != sd else f"{m:.1f} ± {sd:.1f}"


def run_stage(cfg: dict, p: dict, progress: bool = True, log=print) -> dict:
    """Stage 08: encoders × entry variants against the classifier on Table 3's queries; leave-LoRAs-out;
    the cost of adding a LoRA; "none of these" on styles no LoRA paints; thumbnail-only entries;
    query latency. Builds and saves the profile's index (under :func:`index_lock`, as :func:`build`).
    Returns every table (also written)."""
    with index_lock(layout.index_dir(cfg, p["encoder"], p["variant"]), "stage 08 (index)"):
        return _run_stage(cfg, p, progress, log)


def _run_stage(cfg: dict, p: dict, progress: bool, log) -> dict:
    from .files import write_json_atomic

    catalog = load_catalog(cfg)
    k = len(catalog)
    sd = load_style_data(cfg)
    queries, clf_metrics = table3_queries(cfg)
    q_truth = [q["lora"] for q in queries]
    val_rows = [i for i, g in enumerate(sd.data.groups) if g in set(sd.val_ids)]
    val_y = [sd.classes[y] for y in sd.data.y[val_rows].tolist()]
    results: dict = {"queries": len(queries), "chance": {"top1": 1 / k, "mrr": float(np.mean(1 / np.arange(1, k + 1)))}}

    ctx = _Stage08(cfg, p, catalog, k, sd, queries, clf_metrics, q_truth, val_rows, val_y, results, progress)
    methods, (enc, index, zq) = _compare_methods(ctx)
    folder = index.save(layout.index_dir(cfg, p["encoder"], p["variant"]))
    log(f"index saved: {folder} ({len(index)} LoRAs, {enc.kind} encoder, {p['variant']})")
    _leave_loras_out(ctx)
    known_p, unknown_p = _open_set(ctx, enc, index, zq)
    _thumbnail_entries(ctx, index, zq)
    _costs(ctx, enc, folder)
    _stage07_lora(ctx, enc, folder, log)
    write_json_atomic(results, layout.index_results(cfg, "stage08"))
    results["known_p"], results["unknown_p"] = known_p, unknown_p
    results["methods_df"], results["index_folder"] = methods, folder
    return results


@dataclass
class _Stage08:
    """What stage 08's parts share: the profile, its parameters, the data and Table 3's queries."""
    cfg: dict
    p: dict
    catalog: list
    k: int
    sd: StyleData
    queries: list
    clf_metrics: dict
    q_truth: list
    val_rows: list
    val_y: list
    results: dict
    progress: bool


def _compare_methods(c: _Stage08):
    """1. every encoder (trained over seeds) x both entry variants, on Table 3's queries: (table, the default's (encoder, index, query embeddings))."""
    import pandas as pd

    from .files import write_csv_atomic, write_markdown_table
    from .retrieval import retrieval_metrics

    cfg, p, catalog, k, sd, queries, q_truth, results = c.cfg, c.p, c.catalog, c.k, c.sd, c.queries, c.q_truth, c.results
    method_rows, per_run, default = [], [], None
    variants = ("prototype", "content_cancelled")
    for kind in p["compare"]:
        seeds = p["seeds"] if kind == "trained" else [None]
        runs = {v: [] for v in variants}
        for seed in seeds:
            enc = make_encoder(cfg, kind, sd, seed=seed or 0, progress=c.progress)
            zq, errs = enc.embed_files([q["file"] for q in queries])
            if any(e is not None for e in errs):
                raise ValueError(f"unreadable stage-05 queries: {[str(e) for e in errs if e is not None]}")
            emb = embed_style_data(enc, sd)  # once per encoder, for both variants
            z_val = emb.images[c.val_rows]
            for v in variants:
                index = build_index(enc, sd, v, catalog, embedded=emb)
                cal = calibrate(index, z_val, c.val_y)
                m = retrieval_metrics(_ranks(index, zq, q_truth), k)
                runs[v].append(m)
                per_run.append({"encoder": kind, "seed": seed, "variant": v, **m, "val_auroc": cal["validation"]["auroc"]})
                if kind == p["encoder"] and v == p["variant"] and default is None:
                    default = (enc, index, zq)
        for v in variants:
            method_rows.append({"method": f"index: {kind} encoder", "entry": v.replace("_", "-"), **_summary(runs[v])})
    method_rows.append({"method": "classifier (stage 02, retrained per catalog)", "entry": "",
                        **{f"{m}_mean": 100 * c.clf_metrics["all"][m] for m in ("top1", "top3", "top6", "mrr")},
                        **{f"{m}_sd": float("nan") for m in ("top1", "top3", "top6", "mrr")}, "runs": 1})
    methods = pd.DataFrame(method_rows)
    write_csv_atomic(methods, layout.figure(cfg, "index_methods.csv"))
    write_markdown_table(layout.figure(cfg, "index_methods.md"), ["method", "entry", "top-1", "top-3", "top-6", "MRR", "runs"],
                         [[r["method"], r["entry"], *[_fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in ("top1", "top3", "top6", "mrr")],
                           str(r["runs"])] for r in method_rows],
                         f"Percent on stage 05's {len(queries)} queries (Table 3's), mean ± sd over the trained encoder's "
                         f"seeds {p['seeds']}; a random ranking: top-1 {100 / k:.1f} %, MRR {100 * results['chance']['mrr']:.1f} %.")
    results["methods"] = method_rows
    results["runs"] = per_run
    if default is None:
        raise ValueError(f"08_index: encoder '{p['encoder']}' must be one of compare {p['compare']}")
    return methods, default


def _leave_loras_out(c: _Stage08):
    """2. leave-LoRAs-out: the encoder never saw a third of the LoRAs; they enter as `index add` does."""
    from .files import write_markdown_table
    from .retrieval import retrieval_metrics

    cfg, p, catalog, k, sd, queries, q_truth, results = c.cfg, c.p, c.catalog, c.k, c.sd, c.queries, c.q_truth, c.results
    fold_rows = []
    if p["folds"] == 1:
        raise ValueError("08_index: folds must be 0 (skip) or at least 2 (each fold leaves 1/folds of the LoRAs out)")
    if p["folds"] and p["encoder"] == "trained":
        for f in range(p["folds"]):
            new = sd.classes[f :: p["folds"]]
            old = [c for c in sd.classes if c not in new]
            enc_f = make_encoder(cfg, "trained", sd, seed=p["seeds"][0], classes=old,
                                 folder=layout.encoder_dir(cfg, f"{p['run_name']}_fold{f}of{p['folds']}"), progress=c.progress)
            emb_f = embed_style_data(enc_f, sd)
            idx = build_index(enc_f, sd, p["variant"], catalog, classes=old, embedded=emb_f)
            added = build_index(enc_f, sd, p["variant"], catalog, ids=sd.train_ids[: p["add_images"]], classes=new,
                                embedded=emb_f)
            for n in added.names():
                e = added.entry(n)
                idx.add(n, e.vector, e.meta)
            zf, _ = enc_f.embed_files([q["file"] for q in queries])
            ranks = _ranks(idx, zf, q_truth)
            is_new = [t in new for t in q_truth]
            clf = [q["rank_of_correct"] for q in queries]
            fold_rows.append({"fold": f, "new": new,
                              "index_new": retrieval_metrics([r for r, n in zip(ranks, is_new) if n], k),
                              "index_all": retrieval_metrics(ranks, k),
                              "classifier12_new": retrieval_metrics([r for r, n in zip(clf, is_new) if n], k)})
        rows = []
        for label, key in (("index, encoder trained on the other LoRAs; new ones added", "index_new"),
                           ("classifier retrained on all 12 (upper bound)", "classifier12_new")):
            s = _summary([r[key] for r in fold_rows])
            rows.append([label, "the added LoRAs' queries", *[_fmt(s[f"{m}_mean"], s[f"{m}_sd"]) for m in ("top1", "mrr")]])
        s = _summary([r["index_all"] for r in fold_rows])
        rows.append(["index, encoder trained on the other LoRAs; new ones added", "all queries",
                     *[_fmt(s[f"{m}_mean"], s[f"{m}_sd"]) for m in ("top1", "mrr")]])
        rows.append([f"classifier trained on {k - len(fold_rows[0]['new'])} LoRAs", "the added LoRAs' queries", "0.0", "—"])
        write_markdown_table(layout.figure(cfg, "index_leave_out.md"), ["model", "queries", "top-1", "MRR"], rows,
                             f"{p['folds']} folds; in each, {len(fold_rows[0]['new'])} LoRAs are left out of the encoder's "
                             f"training and added from {p['add_images']} restyled base images each (as `lorafind index add` "
                             "does). Percent, mean ± sd over folds. A classifier trained without them cannot name them.")
    results["folds"] = fold_rows


def _open_set(c: _Stage08, enc, index: StyleIndex, zq: np.ndarray):
    """3. "none of these": queries in styles no LoRA paints vs the catalogued ones (Table 3's queries)."""
    from sklearn.metrics import roc_auc_score

    from .files import write_markdown_table
    from .images import load_rgb, read_base_set, square_resize
    from .styles import apply_style

    cfg, p, results = c.cfg, c.p, c.results
    photos = read_base_set(layout.base_set_dir(cfg, p["open_set_set"]))[: p["open_set_images"]]
    size = int(stage_params(cfg, "01_synthesize")["resolution"])
    unknown_imgs, unknown_names = [], []
    for style in p["open_set_styles"]:
        for b in photos:
            unknown_imgs.append(apply_style(style, square_resize(load_rgb(b.path), size)))
            unknown_names.append(f"{style}/{b.id}")
    known_p = match_probability(index, search_vectors(index, zq))
    unknown_scores = search_vectors(index, enc.embed_images(unknown_imgs)) if unknown_imgs else []
    unknown_p = match_probability(index, unknown_scores)
    open_set = {}
    if len(unknown_p):
        t = np.concatenate([np.ones(len(known_p)), np.zeros(len(unknown_p))])
        open_set = {"auroc": float(roc_auc_score(t, np.concatenate([known_p, unknown_p]))),
                    "none_rate_known": float(np.mean(known_p < 0.5)), "none_rate_unknown": float(np.mean(unknown_p < 0.5)),
                    "known": len(known_p), "unknown": len(unknown_p), "styles": p["open_set_styles"],
                    "validation_auroc": index.params["calibration"]["validation"]["auroc"]}
        write_markdown_table(layout.figure(cfg, "index_open_set.md"),
                             ["queries", "count", "'none of these' at P(match) < 0.5"],
                             [["catalogued styles (Table 3's queries)", str(len(known_p)), f"{100 * open_set['none_rate_known']:.1f} %"],
                              [f"styles no LoRA paints ({', '.join(p['open_set_styles'])})", str(len(unknown_p)),
                               f"{100 * open_set['none_rate_unknown']:.1f} %"]],
                             f"AUROC of P(match) {open_set['auroc']:.3f} (validation, leave-one-LoRA-out: "
                             f"{open_set['validation_auroc']:.3f}). Index: {enc.kind} encoder, {p['variant']} entries.")
    results["open_set"] = open_set
    return known_p, unknown_p


def _thumbnail_entries(c: _Stage08, index: StyleIndex, zq: np.ndarray):
    """4. thumbnail-only entries (a LoRA known by its previews) vs synthesized ones, leave-one-query-out."""
    from .retrieval import retrieval_metrics

    k, sd, q_truth, results = c.k, c.sd, c.q_truth, c.results
    by_lora: dict[str, list[int]] = {}
    for i, t in enumerate(q_truth):
        by_lora.setdefault(t, []).append(i)
    proto = np.stack([index.entry(c).vector for c in sd.classes])
    zq_e = queries_as(zq, index.variant, _centroid(index))
    thumb_ranks, synth_ranks = [], []
    for i, t in enumerate(q_truth):
        ents = []
        for c in sd.classes:
            rows = [j for j in by_lora.get(c, []) if j != i]
            v = zq_e[rows].mean(0) if rows else np.zeros(zq_e.shape[1])
            ents.append(v / (np.linalg.norm(v) + 1e-12))
        s = np.stack(ents) @ zq_e[i]
        thumb_ranks.append(int((s > s[sd.classes.index(t)]).sum()) + 1)
        s2 = proto @ zq_e[i]
        synth_ranks.append(int((s2 > s2[sd.classes.index(t)]).sum()) + 1)
    results["thumbnails_vs_synth"] = {"thumbnails": retrieval_metrics(thumb_ranks, k), "synthesized": retrieval_metrics(synth_ranks, k),
                                      "thumbnails_per_lora": float(np.mean([len(v) for v in by_lora.values()])) - 1}


def _costs(c: _Stage08, enc, folder: Path):
    """5. the cost of adding a LoRA vs retraining the classifier; query latency."""
    from .files import write_markdown_table

    cfg, p, catalog, queries, results = c.cfg, c.p, c.catalog, c.queries, c.results
    import shutil
    import tempfile

    from .models import cached_pipeline

    cached_pipeline(cfg, stage_params(cfg, "01_synthesize")["dtype"])  # loaded once, as in a long-lived process
    with tempfile.TemporaryDirectory(prefix="lorafind-add-") as tmp:
        scratch = Path(tmp) / folder.name  # a copy: the measured add must not change the profile's index
        shutil.copytree(folder, scratch)
        r = IndexRanker(cfg, enc, scratch)
        e = catalog[0]
        add = add_lora(cfg, e["path"], name=f"{e['slug']}_copy", ranker=r, progress=False, log=lambda *a: None)
    m02 = layout.metrics_file(layout.train_dir(cfg, _p02(cfg)["run_name"]))
    import json

    retrain = json.loads(m02.read_text())["finetuned"]["train_seconds"] if m02.exists() else float("nan")
    results["add"] = {**add, "classifier_retrain_seconds": retrain, "ratio": add["seconds"] / retrain if retrain == retrain else None}
    ranker = IndexRanker(cfg, enc, folder)
    lat = []
    ranker.rank_files([queries[0]["file"]])  # warm-up
    for i in range(p["latency_queries"]):
        t0 = time.perf_counter()
        ranker.rank_files([queries[i % len(queries)]["file"]])
        lat.append(1000 * (time.perf_counter() - t0))
    results["latency_ms"] = {"p50": float(np.median(lat)), "p90": float(np.percentile(lat, 90)), "n": len(lat)}
    tv = results["thumbnails_vs_synth"]
    cost_rows = [["add one LoRA (restyle + embed + add + save)", f"{add['seconds']:.1f} s ({add['images']} images; restyling "
                  f"{add['restyle_seconds']:.1f} s)"],
                 ["retrain the classifier (stage 02's training time)", f"{retrain:.1f} s"],
                 ["ratio", f"{results['add']['ratio']:.3f}" if results["add"]["ratio"] is not None else "—"],
                 ["one query, file → ranking (model loaded)", f"p50 {results['latency_ms']['p50']:.1f} ms, p90 "
                  f"{results['latency_ms']['p90']:.1f} ms"],
                 ["entries from the LoRAs' own previews (leave-one-out)", f"top-1 {100 * tv['thumbnails']['top1']:.1f} %, MRR "
                  f"{100 * tv['thumbnails']['mrr']:.1f} %"],
                 ["entries from restyled base images", f"top-1 {100 * tv['synthesized']['top1']:.1f} %, MRR "
                  f"{100 * tv['synthesized']['mrr']:.1f} %"]]
    write_markdown_table(layout.figure(cfg, "index_costs.md"), ["measure", "value"], cost_rows,
                         f"Index: {enc.kind} encoder, {p['variant']} entries; CPU ({cfg['name']} profile).")


def _stage07_lora(c: _Stage08, enc, folder: Path, log=print) -> None:
    """6. Stage 07's trained LoRAs join a copy of the index as ``lorafind index add`` adds them (their kohya
    files); each is then ranked for stage 07's held-out style images (never trained on). Skipped, and
    said so, when stage 07 has not run."""
    import shutil
    import tempfile

    from .files import write_markdown_table
    from .lora_training import read_style_set, split_style_set

    cfg, results = c.cfg, c.results
    p07 = stage_params(cfg, "07_train_style_lora")
    run_dir = layout.style_lora_dir(cfg, p07["run_name"])
    files = {r: layout.lora_kohya_file(layout.style_rank_dir(run_dir, r)) for r in p07["ranks"]}
    if not layout.sweep_file(run_dir).exists() or not all(f.exists() for f in files.values()):
        results["style_lora"] = {"skipped": f"stage 07 has not run ({run_dir})"}
        log(f"stage 07's LoRAs: not in {run_dir}; run stage 07 first to add them to the index")
        return
    from .config import resolve

    style_dir = resolve(p07["style_dir"]) if p07["style_dir"] else layout.style_set_dir(run_dir)
    items = read_style_set(style_dir, p07["caption_template"], p07["style_name"], int(p07["resolution"]))
    _, heldout = split_style_set(items, float(p07["holdout"]), int(p07["seed"]))
    rows, out = [], {}
    with tempfile.TemporaryDirectory(prefix="lorafind-style-lora-") as tmp:
        for r, f in files.items():
            scratch = Path(tmp) / f"r{r}"  # each rank alone: the profile's index stays as stage 08 saved it
            shutil.copytree(folder, scratch)
            ranker = IndexRanker(cfg, enc, scratch)
            name = f"{p07['run_name']}_r{r}"
            add_lora(cfg, f, name=name, ranker=ranker, progress=False, log=lambda *a: None)
            ranked = ranker.rank_images([it.image for it in heldout], [it.file for it in heldout])
            ranks = [q.rank_of(name) for q in ranked]
            out[str(r)] = {"name": name, "ranks": ranks, "top1": float(np.mean([x == 1 for x in ranks])),
                           "mrr": float(np.mean([1 / x for x in ranks])), "entries": len(ranker.index)}
            rows.append([f"rank {r}", str(len(ranks)), f"{100 * out[str(r)]['top1']:.1f} %",
                         f"{100 * out[str(r)]['mrr']:.1f} %", " ".join(map(str, ranks))])
    results["style_lora"] = {"style": p07["style_name"], "heldout": len(heldout), "per_rank": out}
    write_markdown_table(layout.figure(cfg, "index_style_lora.md"),
                         ["stage-07 LoRA", "held-out style images", "found first", "MRR", "rank of the LoRA per image"], rows,
                         f"Each of stage 07's LoRAs ('{p07['style_name']}') added to the index from its kohya file as "
                         f"`lorafind index add` does ({c.p['add_images']} restyled base images), then ranked among "
                         f"{len(c.catalog) + 1} entries for stage 07's held-out style images.")
