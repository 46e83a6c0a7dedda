"""Stage 08: rank LoRAs by style embedding -- add a LoRA without retraining, say "none of these".

A LoRA's entry is one unit vector (:mod:`lorafind_utils.rank.style_index`, faiss, exact inner product):

* ``prototype``: the normalised mean of the embeddings of images it painted (CSD's prototypes);
* ``content_cancelled``: the normalised mean of (embedding of a restyled image - embedding of
  its base photo) -- the LoRA as a direction away from the photo (CARLoS). A query has no base
  photo, so it is compared as (query - mean embedding of the base photos).

Adding a LoRA restyles a few base images with it, embeds them and adds one vector: no training.
A LoRA known only by its preview images is added from them (``source: thumbnails``).

"None of these": the ranking's best score is calibrated into P(the catalog has the query's LoRA)
on validation data (:mod:`lorafind_utils.rank.open_set`: top-1 cosine, CSLS or per-entry spread,
whichever validates best). The threshold is P = 0.5.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, stage_params
from lorafind_utils.rank.open_set import CANDIDATES, fit_calibration, match_probability
from lorafind_utils.rank.style_index import StyleIndex

STAGE = "08_index"


def _p(cfg: dict) -> dict:
    return stage_params(cfg, STAGE)


def finetune_params(cfg: dict) -> dict:
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
    from lorafind_utils.core.images import load_rgb, read_base_set, square_resize
    from lorafind_utils.models.classifier import cached_set, group_split

    p02 = finetune_params(cfg)
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
    from lorafind_utils.models.pipelines import profile_device
    from lorafind_utils.models.style_encoder import clip_encoder, load_trained, train_encoder, training_free

    p, p02 = _p(cfg), finetune_params(cfg)
    device = profile_device(cfg)
    if kind in ("imagenet", "gram"):
        return training_free(kind, p02["backbone"], p02["weights"], int(p02["image_size"]), device)
    if kind.startswith("clip:"):
        return clip_encoder(kind[5:], int(p02["image_size"]), device)
    if kind == "gramstats":
        return _gramstats_for(cfg, p, p02, sd, classes, folder, device)
    if kind != "trained":
        raise ValueError(f"unknown encoder '{kind}' (trained | gramstats | imagenet | gram | clip:<hub id or folder>)")
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


def _gramstats_for(cfg: dict, p: dict, p02: dict, sd: StyleData | None, classes: list[str] | None,
                   folder: Path | None, device: str):
    """The ``gramstats`` encoder from ``folder``, or fitted on the training base images' restyles by
    ``classes`` (default: every LoRA) and their unstyled photos, and saved there."""
    import torch

    from lorafind_utils.models.style_encoder import fit_gramstats, load_gramstats

    folder = Path(folder or layout.encoder_dir(cfg, f"{p['run_name']}_gramstats"))
    backbone, weights, size = p02["backbone"], p02["weights"], int(p02["image_size"])
    if (folder / "encoder.json").exists():
        return load_gramstats(folder, backbone, weights, size, device)
    sd = sd or load_style_data(cfg)
    keep, train = set(classes or sd.classes), set(sd.train_ids)
    rows = [i for i, (y, g) in enumerate(zip(sd.data.y.tolist(), sd.data.groups))
            if sd.classes[y] in keep and g in train]
    photos = [sd.base_photos[i] for i in sd.train_ids if i in sd.base_photos]
    x = torch.cat([sd.data.x[rows], *([torch.stack(photos)] if photos else [])])
    enc = fit_gramstats(x, backbone, weights, size, dim=p["embed_dim"], device=device)
    enc.extra["fit_on"] = sorted(keep)
    enc.save(folder)
    return enc


# --- entries and queries ------------------------------------------------------------------------

def photo_centroid(encoder, sd: StyleData, ids: list[str], embedded: Embedded | None = None) -> np.ndarray:
    """Mean embedding of the unstyled base photos (the content a query's style is measured from)."""
    import torch

    if embedded is not None:
        return np.stack([embedded.photos[i] for i in ids if i in embedded.photos]).mean(0)
    x = torch.stack([sd.base_photos[i] for i in ids if i in sd.base_photos])
    return encoder.embed(x).mean(0)


def _directions(z: np.ndarray, variant: str, z_base: np.ndarray | None) -> np.ndarray:
    """The rows an entry averages: unit embeddings, or (content-cancelled) unit image - photo."""
    if variant == "content_cancelled":
        if z_base is None:
            raise ValueError("content-cancelled entries need the base photos of the LoRA's images")
        z = z - z_base
        z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
    return z


def entry_vector(z: np.ndarray, variant: str, z_base: np.ndarray | None = None) -> np.ndarray:
    """One entry vector from the embeddings ``z`` of a LoRA's images; ``z_base``: of their base photos."""
    v = _directions(z, variant, z_base).mean(0)
    return v / (np.linalg.norm(v) + 1e-12)


def self_similarity(z: np.ndarray, variant: str, z_base: np.ndarray | None = None,
                    centroid: np.ndarray | None = None) -> list[float] | None:
    """(mean, sd) similarity of a LoRA's own images, each measured as a query is (:func:`queries_as`),
    to the entry made from its other images -- the ``spread`` score's scale; None under 3 images."""
    d = _directions(z, variant, z_base)
    if len(d) < 3:
        return None
    others = d.sum(0)[None, :] - d
    others /= np.linalg.norm(others, axis=1, keepdims=True) + 1e-12
    c = (queries_as(z, variant, centroid) * others).sum(1)
    return [round(float(c.mean()), 6), round(float(c.std()), 6)]


def lora_embeddings(encoder, x, variant: str, base_x=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The embeddings of a LoRA's images (uint8 [N, 3, S, S]) and, for content-cancelled entries, of
    their base photos ``base_x``: what :func:`entry_vector` and :func:`self_similarity` read."""
    z_base = encoder.embed(base_x) if variant == "content_cancelled" and base_x is not None else None
    return encoder.embed(x), z_base


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
    centroid = photo_centroid(encoder, sd, sorted(ids), emb) if variant == "content_cancelled" else None
    for k, slug in enumerate(sd.classes):
        if classes is not None and slug not in classes:
            continue
        rows = [i for i, (y, g) in enumerate(zip(sd.data.y.tolist(), sd.data.groups)) if y == k and g in ids]
        z_base = np.stack([emb.photos[sd.data.groups[i]] for i in rows]) if variant == "content_cancelled" else None
        v = entry_vector(emb.images[rows], variant, z_base)
        index.add(slug, v,
                  {"short": short[slug]["short"], "file": Path(short[slug]["path"]).name, "source": "synthesized",
                   "n_images": len(rows), "sha256": short[slug].get("sha256") or "",
                   "self_sim": self_similarity(emb.images[rows], variant, z_base, centroid)})
    if centroid is not None:
        index.params["photo_centroid"] = centroid.astype(float).round(6).tolist()
    return index


def stored_centroid(index: StyleIndex) -> np.ndarray | None:
    c = index.params.get("photo_centroid")
    return np.asarray(c, np.float32) if c is not None else None


def search_vectors(index: StyleIndex, z: np.ndarray, k: int | None = None) -> list[list[tuple[str, float]]]:
    return index.search(queries_as(z, index.variant, stored_centroid(index)), k or len(index))


# --- "none of these" ---------------------------------------------------------------------------

def calibrate(index: StyleIndex, z_val: np.ndarray, y_val: list[str]) -> dict:
    """Fit P(match) on validation images (known: full index; unknown: leave their LoRA out) under every
    score of :mod:`lorafind_utils.rank.open_set`, keep the best and store it in the index's parameters.
    Returns the calibration record (with each score's validation AUROC)."""
    return fit_calibration(index, search_vectors(index, z_val), y_val)


# --- ranking ------------------------------------------------------------------------------------

class IndexRanker:
    """Ranks the index's LoRAs for query images; the index is re-read when it changes on disk, so a
    LoRA added by ``lorafind index add`` is seen by the next query (the widget included)."""

    def __init__(self, cfg: dict, encoder, folder: Path, top_k: int | None = None):
        """``top_k``: LoRAs per ranking (None: every entry; a large catalog wants a few)."""
        self.cfg, self.encoder, self.folder, self.top_k = cfg, encoder, Path(folder), top_k
        self._index, self._stamp = None, None
        self.backbone = f"style index ({encoder.kind} encoder)"

    @classmethod
    def from_profile(cls, cfg: dict) -> IndexRanker:
        p = _p(cfg)
        folder = layout.index_dir(cfg, p["encoder"], p["variant"])
        if not (folder / "index.json").exists():
            raise FileNotFoundError(f"no LoRA index in {folder}: build it first (`lorafind index build --profile "
                                    f"{cfg['name']}` or notebook 08_index)")
        enc = (
            _load_trained_for(cfg, p) if p["encoder"] == "trained" else make_encoder(cfg, p["encoder"], progress=False)
        )
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
        """One :class:`~lorafind_utils.rank.classifier_ranker.Ranking` (with ``match``) or ImageError per path."""
        z, errors = self.encoder.embed_files(paths)
        return self._rankings(z, errors, [str(p) for p in paths] if names is None else names)

    def rank_images(self, images, names: list[str]) -> list:
        return self._rankings(self.encoder.embed_images(images), [None] * len(images), names)

    def rank(self, images: list, names: list[str] | None = None) -> list:
        """Rank PIL images (as :meth:`lorafind_utils.rank.classifier_ranker.Ranker.rank` does)."""
        return self.rank_images(images, names or [f"image {i}" for i in range(len(images))])

    def _rankings(self, z, errors, names) -> list:
        from lorafind_utils.rank.classifier_ranker import Ranking

        index = self.index
        k = None if self.top_k is None else max(int(self.top_k), CANDIDATES)  # what P(match) reads
        scores = search_vectors(index, z, k) if len(z) else []
        probs = match_probability(index, scores)
        out, j = [], 0
        for name, err in zip(names, errors):
            if err is not None:
                out.append(err)
                continue
            r = scores[j][: self.top_k]
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
    from lorafind_utils.models.pipelines import profile_device
    from lorafind_utils.models.style_encoder import load_trained

    return load_trained(layout.encoder_dir(cfg, f"{p['run_name']}_s{p['seeds'][0]}"), profile_device(cfg))


# --- building, adding, removing -----------------------------------------------------------------

INDEX_WAIT_S = 120.0
"""How long an ``index add``/``remove``/``build`` waits for another one writing the same index before
it is refused (with a message naming the holder)."""


@contextmanager
def index_lock(folder: str | Path, what: str = "the index"):
    """The lock every writer of an index folder holds from its *read* to its save (a read before
    it would let a second writer save a stale copy over the first one's change): the project's
    :func:`~lorafind_utils.core.files.run_lock`, waiting up to :data:`INDEX_WAIT_S` for its turn."""
    from lorafind_utils.core.files import run_lock

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
    from lorafind_utils.rank.style_index import IndexEntryExists

    return IndexEntryExists(f"'{slug}' is already in the index {folder}; pass --replace to replace it")


def add_lora(cfg: dict, file: str | Path, n_images: int | None = None, name: str | None = None,
             replace: bool = False, progress: bool = True, log=print, ranker: IndexRanker | None = None) -> dict:
    """Add a LoRA file: check it (as ``lorafind lora check``), restyle ``n_images`` base images with
    it (stage 01's settings, pipeline and seeds), embed, add one entry, save -- no training.

    :raises LoraError: a file ``lora check`` refuses (the index is unchanged).
    :raises IndexEntryExists: the name exists and ``replace`` is not set.
    """
    import torch

    from lorafind_utils.core.config import SLUG
    from lorafind_utils.core.images import read_base_set
    from lorafind_utils.models.loras import check_lora_against_model, inspect_lora, load_lora
    from lorafind_utils.models.pipelines import base_skeletons, cached_pipeline
    from lorafind_utils.models.restyle import batches, item_seed, prepare_base_images, restyle

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
    bases = read_base_set(layout.base_set_dir(cfg, finetune_params(cfg)["train_set"]))[:n]
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
    z, z_base = lora_embeddings(enc, x, index.variant, base_x)
    vec = entry_vector(z, index.variant, z_base)
    from lorafind_utils.core.files import sha256_file

    meta = {"short": slug, "file": file.name, "source": "synthesized", "n_images": len(ims),
            "sha256": sha256_file(file), "layout": info.layout}
    with index_lock(ranker.folder):  # read, add, save: all under the lock (another add may have landed)
        index = ranker.read_fresh()
        if slug in index and not replace:
            raise _exists_error(slug, ranker.folder)
        # measured against the index as it is now (its photo centroid), not as first read
        meta["self_sim"] = self_similarity(z, index.variant, z_base, stored_centroid(index))
        index.add(slug, vec, meta, replace=replace)
        index.save(ranker.folder)
    secs = time.perf_counter() - t0
    log(f"added {slug} ({info.layout}, {len(ims)} restyled images) to {ranker.folder} in {secs:.1f} s "
        f"(restyling {t_restyle:.1f} s); {len(index)} LoRAs")
    return {"name": slug, "seconds": secs, "restyle_seconds": t_restyle, "images": len(ims), "entries": len(index)}


def add_thumbnails(cfg: dict, folder: str | Path, name: str, replace: bool = False, log=print) -> dict:
    """Add a LoRA known only by its preview images (no synthesis): the mean of their embeddings.

    Content-cancelled indexes measure previews from the photo centroid, as they measure queries."""
    from lorafind_utils.core.config import SLUG
    from lorafind_utils.core.images import IMAGE_SUFFIXES

    if not SLUG.fullmatch(name or ""):
        raise ValueError(f"'{name}' is not a usable LoRA name (letters, digits, '.', '_', '-')")
    files = (
        sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    )
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
        z = queries_as(z_raw, index.variant, stored_centroid(index))
        v = entry_vector(z, "prototype")  # previews are measured as queries are: already in the entries' space
        index.add(name, v, {"short": name, "file": "", "source": "thumbnails", "n_images": int(len(z)),
                            "self_sim": self_similarity(z, "prototype")}, replace=replace)
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


