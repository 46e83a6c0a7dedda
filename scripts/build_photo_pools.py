#!/usr/bin/env python3
"""Rebuild data/images/lora_train/ and data/images/queries/ (the tiny world's two new photo pools).

The pools are disjoint from each other and from the base images (data/images/variety, faces): no
source image is used twice (every crop of a source goes to one pool), and every kept photo is
checked by perceptual hash (DCT pHash, 64 bits) against the base images and the other kept photos:
Hamming distance <= 10 is a near-duplicate and dropped.

Sources (none of them is used by the base images; see data/images/README.md for those):
* tuxpaint-stamps-default: real-photo stamps (cut-out animals, food, objects), composited on white
  and padded to a square -- GPL-2 (debian/copyright, Files: *, Bill Kendrick and contributors).
* gnome-control-center-data: the 512 px avatar photos the base set did not use -- CC0-1.0.
* opencv-doc: sample photos the base set did not use -- Apache-2.0 AND BSD-3-Clause.
* dde-account-faces: two unused Unsplash photos -- GPL-3.0-or-later (originally CC0).
* scikit-image (PyPI wheel) skimage/data: hubble_deep_field, retina, clock_motion, ihc.

How to rebuild (no project dependency is added; scikit-image only in the venv used to gather)::

    mkdir -p /tmp/tw_debs && cd /tmp/tw_debs && apt-get update && \
      apt-get download tuxpaint-stamps-default gnome-control-center-data opencv-doc dde-account-faces
    for f in *.deb; do p=${f%%_*}; mkdir -p /tmp/tw_root/$p; dpkg-deb -x $f /tmp/tw_root/$p; done
    .venv/bin/pip install scikit-image
    .venv/bin/python scripts/build_photo_pools.py --root /tmp/tw_root

Output: 144x144 JPEG q90 files + manifest.csv (file,subject,category,source,license,original_size).
Deterministic for the same package versions (Debian bookworm, scikit-image 0.26, Pillow 13).
"""
from __future__ import annotations

import argparse
import csv
import glob
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "images"
SIZE = 144
PHASH_MAX = 10

L_TUX = "GPL-2 (Tux Paint stamps, Bill Kendrick and contributors; tuxpaint-stamps-default debian/copyright Files: *)"
L_GNOME = "CC0-1.0 (GNOME user avatar photo; gnome-control-center-data copyright lists CC0-1.0, no per-file author)"
L_OPENCV = ("Apache-2.0 AND BSD-3-Clause (OpenCV sample data, opencv-doc debian/copyright Files: *; "
            "photographer not recorded)")
L_GIMP = "GFDL-NIV-1.2+ (GIMP documentation team, gimp-help-en; gimp-help-common debian/copyright Files: *)"
L_DDE = "GPL-3.0-or-later (dde-account-faces; photo from Unsplash, originally CC0, per debian/copyright)"

TUX = "tuxpaint-stamps-default"
TUX_EXCLUDE = {  # clip art, renders, mirrored duplicates, toys
    "spider_computer", "spider_fly", "wings", "button", "snowman", "grannysmith", "chuvanna_plastic",
    "bunny-egg", "bunny", "chick-hatched", "cityhouse", "igloo", "wooden_cottage", "railroad_crossing",
    "toilets", "dumper_mirror", "bradley_mirror", "balloon360", "basketball", "edward_bear", "indycar",
    "chineseJunk", "explosion", "2_venus", "6_saturn", "7_uranus", "8_neptune", "final-roll-call",
    "German_Christmas", "Christmas_Tree_p", "jackolantern_mea", "candle", "syringe",
}
GNOME = "gnome-control-center-data:/usr/share/pixmaps/faces/"
GNOME_FILES = ["astronaut.jpg", "cat-eye.jpg", "chess.jpg", "coffee.jpg", "dice.jpg", "energy-arc.jpg", "fish.jpg",
               "flake.jpg", "flower.jpg", "grapes.jpg", "guitar.jpg", "launch.jpg", "leaf.jpg", "lightning.jpg",
               "penguin.jpg", "puppy.jpg", "sky.jpg", "sunflower.jpg", "sunset.jpg", "yellow-rose.jpg"]
OCV = "opencv-doc:/usr/share/doc/opencv-doc/examples/"
OCV_FILES = ["text/scenetext01.jpg", "text/scenetext02.jpg", "text/scenetext03.jpg", "text/scenetext04.jpg",
             "text/scenetext05.jpg", "text/scenetext06.jpg", "dnn_superres/butterfly.png", "data/pca_test1.jpg",
             "data/licenseplate_motion.jpg", "reg/LR_05.png"]
GIMP = "gimp-help-en:/usr/share/gimp/2.0/help/en/images/"
GIMP_FILES: list[str] = []  # (none kept: the example originals are the base set's or derived images)
DDE = "dde-account-faces:/var/lib/AccountsService/icons/bigger/"
SKIMAGE = [("hubble_deep_field.jpg", "galaxies", "Public Domain (NASA, HubbleSite; skimage.data docstring)"),
           ("retina.jpg", "retina", "CC0-1.0 (Mikael Häggström, Wikimedia Commons; skimage.data docstring)"),
           ("clock_motion.png", "clock", "Public Domain (Stefan van der Walt; skimage.data docstring)"),
           ("ihc.png", "tissue_stain", "No known copyright restrictions (CMMI; skimage.data docstring)")]

#: sources whose photos become queries (every other source goes to lora_train)
QUERY_SOURCES = (
    {
        GNOME + f
        for f in [
            "cat-eye.jpg",
            "chess.jpg",
            "coffee.jpg",
            "grapes.jpg",
            "penguin.jpg",
            "puppy.jpg",
            "sunflower.jpg",
            "sunset.jpg",
        ]
    }
    | {OCV + f for f in ["text/scenetext02.jpg", "text/scenetext05.jpg", "dnn_superres/butterfly.png"]}
    | {
        f"{TUX}:{n}"
        for n in [
            "frog",
            "owl",
            "giraffe",
            "zebra",
            "koala",
            "strawberry2",
            "broccoli",
            "drumkit",
            "Lightbulb",
            "firetruck",
            "anemone_red",
            "rambutan",
            "walnutBoat",
        ]
    }
)


def phash(im: Image.Image) -> np.ndarray:
    g = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float32)
    d = cv2.dct(g)[:8, :8]
    return (d > np.median(d)).flatten()


def on_white_square(im: Image.Image) -> Image.Image:
    """A cut-out stamp composited on white and padded (not cropped) to a square, object centred."""
    im = im.convert("RGBA")
    bbox = im.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox() or (0, 0, *im.size)
    im = im.crop(bbox)
    s = int(max(im.size) * 1.08)
    bg = Image.new("RGBA", (s, s), (255, 255, 255, 255))
    bg.alpha_composite(im, ((s - im.width) // 2, (s - im.height) // 2))
    return bg.convert("RGB")


def square(im: Image.Image) -> Image.Image:
    return ImageOps.fit(im.convert("RGB"), (SIZE, SIZE), Image.Resampling.LANCZOS)


def crops(im: Image.Image, n_extra: int):
    """The centre square, plus up to n_extra distinct corner squares (60% of the short side) of big photos."""
    yield "", square(im)
    w, h = im.size
    s = int(0.6 * min(w, h))
    if min(w, h) < 400 or n_extra <= 0:
        return
    boxes = [(0, 0), (w - s, h - s), (w - s, 0), (0, h - s)]
    for k, (x, y) in enumerate(boxes[:n_extra]):
        yield f"_crop{k + 1}", square(im.crop((x, y, x + s, y + s)))


def candidates(root: Path):
    """(source id, PIL image, subject, category, licence, extra crops) in a fixed order."""
    tux = sorted(glob.glob(str(root / TUX / "usr/share/tuxpaint/stamps/**/*.png"), recursive=True))
    for f in tux:
        name = Path(f).stem
        if name in TUX_EXCLUDE:
            continue
        im = Image.open(f)
        im.load()
        if min(im.size) < 120:
            continue
        a = np.asarray(im.convert("RGBA"))
        op = a[..., 3] > 200
        if op.mean() < 0.2:
            continue
        if len(np.unique(a[op][:, :3].astype(np.int32) @ np.array([65536, 256, 1]))) <= 6000:
            continue  # flat-colour clip art, not a photo
        cat = Path(f).parent.relative_to(root / TUX / "usr/share/tuxpaint/stamps").parts[0]
        cat = {"animals": "animals", "food": "food", "plants": "plants", "vehicles": "objects"}.get(cat, "objects")
        yield f"{TUX}:/" + str(Path(f).relative_to(root / TUX)), im, name.lower(), cat, L_TUX, 0
    for f in GNOME_FILES:
        yield (
            GNOME + f,
            Image.open(root / "gnome-control-center-data/usr/share/pixmaps/faces" / f),
            Path(f).stem,
            "objects",
            L_GNOME,
            1,
        )
    for f in OCV_FILES:
        yield (
            OCV + f,
            Image.open(root / "opencv-doc/usr/share/doc/opencv-doc/examples" / f),
            Path(f).stem,
            "objects",
            L_OPENCV,
            2,
        )
    for f in GIMP_FILES:
        p = root / "gimp-help-en/usr/share/gimp/2.0/help/en/images" / f
        if p.exists():
            yield GIMP + f, Image.open(p), Path(f).stem, "objects", L_GIMP, 1
    for f in ["5.png", "9.png"]:
        yield (
            DDE + f,
            Image.open(root / "dde-account-faces/var/lib/AccountsService/icons/bigger" / f),
            "photo",
            "objects",
            L_DDE,
            0,
        )
    import skimage

    d = Path(skimage.__file__).parent / "data"
    for f, subj, lic in SKIMAGE:
        yield f"pypi:scikit-image:skimage/data/{f}", Image.open(d / f), subj, "objects", lic, 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/tw_root", help="folder with one dpkg-deb -x extraction per package")
    a = ap.parse_args()
    root = Path(a.root)
    taken = [
        phash(Image.open(p))
        for p in sorted(glob.glob(str(OUT / "variety" / "*.jpg")) + glob.glob(str(OUT / "faces" / "*.jpg")))
    ]
    pools = {"lora_train": [], "queries": []}
    dropped = []
    for src, im, subj, cat, lic, extra in candidates(root):
        orig = f"{im.size[0]}x{im.size[1]}"
        im = im.convert("RGB") if im.mode != "RGBA" else on_white_square(im)
        key = f"{TUX}:{Path(src).stem}" if src.startswith(TUX) else src
        pool = "queries" if key in QUERY_SOURCES else "lora_train"
        for suffix, sq in crops(im, extra):
            h = phash(sq)
            dmin = min(int((h != t).sum()) for t in taken)
            if dmin <= PHASH_MAX:
                dropped.append((src + suffix, dmin))
                continue
            taken.append(h)
            subject = "".join(c if c.isalnum() else "_" for c in subj).strip("_").lower()[:28] + suffix
            pools[pool].append((sq, subject, cat, src if not suffix else f"{src}#{suffix[1:]}", lic, orig))
    for pool, rows in pools.items():
        d = OUT / pool
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        with open(d / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "subject", "category", "source", "license", "original_size"])
            for i, (sq, subject, cat, src, lic, orig) in enumerate(rows, 1):
                name = f"{i:03d}_{subject}.jpg"
                sq.save(d / name, quality=90)
                w.writerow([name, subject, cat, src if src.startswith("pypi:") else f"debian:{src}", lic, orig])
        print(pool, len(rows))
    print("dropped as near-duplicates (pHash distance):", dropped)


if __name__ == "__main__":
    main()
