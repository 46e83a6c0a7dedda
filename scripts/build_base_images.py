#!/usr/bin/env python3
"""Rebuild the committed base-image sets under data/images/ from offline sources.

Sets produced
-------------
* data/images/variety/NNN_<subject>.jpg  -- real photographs of varied subjects,
  shorter side resized to 256 px then centre-cropped to 256x256, JPEG q=90.
* data/images/faces/NNN_face.jpg         -- real human faces, 128x128 JPEG q=92
  (square crop around the face; mostly the 25x25 LFW subset shipped in the
  scikit-image wheel, upscaled -- the manifest records the true original size).
Each folder has manifest.csv with columns
``file,subject,category,source,license,original_size``.

Every input is a hand-curated entry in the tables below (photo vs. non-photo and
licence were checked by hand against /usr/share/doc/<pkg>/copyright and the
package metadata); nothing is picked up by globbing, so the output is
deterministic.  Near-duplicates (pHash Hamming distance <= 6, or a mean absolute
difference of 16x16 grey thumbnails < 6/255) are dropped across both sets, first
entry wins.

How to rebuild
--------------
1. Scratch venv (no torch needed)::

       python3 -m venv /tmp/imgvenv
       /tmp/imgvenv/bin/pip install scikit-image scikit-learn matplotlib pillow \
           imagehash 'opencv-python-headless<5'

   (OpenCV 5 dropped ``cv2.CascadeClassifier``; 4.x is needed for the Haar
   cascade used to locate faces.)
2. Debian packages (bookworm), each extracted into its own folder::

       apt-get update
       mkdir -p /tmp/debs /tmp/debroot && cd /tmp/debs
       apt-get download gnome-control-center-data mate-backgrounds \
           lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 \
           plasma-workspace-wallpapers palapeli-data darknet opencv-doc \
           dde-account-faces lxqt-themes enlightenment-data gimp-help-en
       for f in *.deb; do p=${f%%_*}; mkdir -p /tmp/debroot/$p; \
           dpkg-deb -x $f /tmp/debroot/$p; done

3. Enlightenment backgrounds are Edje (.edj) archives; the script unpacks them
   with ``edje_decc`` (``apt-get install libedje-bin``) into --edj-cache.
4. Run::

       /tmp/imgvenv/bin/python scripts/build_base_images.py \
           --debroot /tmp/debroot --edj-cache /tmp/edj

   It wipes and rewrites data/images/variety and data/images/faces.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "images"

VARIETY_SIZE = 256
FACE_SIZE = 128
PHASH_MAX_DIST = 6
THUMB_MAD_MAX = 6.0  # on a 0..255 scale, 16x16 greyscale thumbnails

# ---------------------------------------------------------------- licences
L_LOMIRI = "{lic} ({author}, 2018; lomiri-wallpapers-16.04 debian/copyright)"
L_MATE = "GPL-2+ ({author}; mate-backgrounds debian/copyright)"
L_PLASMA = "LGPL-3.0 ({author}; plasma-workspace-wallpapers metadata.json)"
L_GNOME = ("CC0-1.0 (GNOME user avatar photo; gnome-control-center-data copyright "
           "lists CC0-1.0, no per-file author)")
L_DDE = ("GPL-3.0-or-later (dde-account-faces; photo from Unsplash, originally CC0, "
         "per debian/copyright)")
L_DARKNET = "GPL-3.0+ or MIT or WTFPL (darknet, Joseph Redmon; debian/copyright Files: *)"
L_OPENCV = ("Apache-2.0 AND BSD-3-Clause (OpenCV sample data, opencv-doc debian/copyright "
            "Files: *; photographer not recorded)")
L_LXQT = "CC-BY-SA-3.0 (LXQt Project Team{extra}; lxqt-themes wallpapers/License)"
L_E = ("BSD-2-clause (Carsten Haitzler and contributors; enlightenment-data "
       "debian/copyright Files: *)")
L_GIMP = ("GFDL-NIV-1.2+ (GIMP documentation team, gimp-help-en; "
          "gimp-help-common debian/copyright Files: *)")

# ---------------------------------------------------------------- variety
# (package, path inside package, subject, category, licence)
D = "debian"
BG = "/usr/share/backgrounds/"
MATE = "/usr/share/backgrounds/mate/nature/"
DK = "/usr/share/darknet/data/"
PAL = "/usr/share/palapeli/collection/"
GF = "/usr/share/pixmaps/faces/"
DDE = "/var/lib/AccountsService/icons/bigger/"
OCV = "/usr/share/doc/opencv-doc/examples/"
LXQT = "/usr/share/lxqt/wallpapers/"
GH = "/usr/share/gimp/2.0/help/en/images/filters/examples/"
EBG = "/usr/share/enlightenment/data/backgrounds/"


def plasma(name: str) -> str:
    return f"/usr/share/wallpapers/{name}/contents/images/"  # largest file chosen at runtime


VARIETY: list[tuple[str, str, str, str, str]] = [
    # lomiri-wallpapers-16.04 / -20.04
    ("lomiri-wallpapers-16.04", BG + "Bridge_by_Sander_Klootwijk.jpg", "bridge", "buildings",
     L_LOMIRI.format(lic="CC-BY-SA-4.0", author="Sander Klootwijk")),
    ("lomiri-wallpapers-16.04", BG + "Dragonfly_by_Bolly.jpg", "dragonfly_leaves", "animals",
     L_LOMIRI.format(lic="CC-BY-SA-4.0", author='"Bolly"')),
    ("lomiri-wallpapers-16.04", BG + "Picture_0B_by_freespace.jpg", "fig_bowl", "food",
     L_LOMIRI.format(lic="CC-BY-4.0", author='Trevor "Freespace"')),
    ("lomiri-wallpapers-16.04", BG + "Picture_1A_by_freespace.jpg", "paintbrushes", "objects",
     L_LOMIRI.format(lic="CC-BY-4.0", author='Trevor "Freespace"')),
    ("lomiri-wallpapers-16.04", BG + "Wine_by_Jakkub_Mede.jpg", "wine_room", "objects",
     L_LOMIRI.format(lic="CC-BY-4.0", author="Jakub Mede")),
    ("lomiri-wallpapers-16.04", BG + "aitzgorri_by_Aitzol_Berasategi.jpg", "mountain_meadow",
     "landscapes", L_LOMIRI.format(lic="CC-BY-4.0", author="Aitzol Berasategi")),
    ("lomiri-wallpapers-16.04", BG + "free_by_Peter_Nerlich.jpg", "lamp", "objects",
     L_LOMIRI.format(lic="CC-BY-SA-4.0", author="Peter Nerlich")),
    ("lomiri-wallpapers-16.04", BG + "greentock_by_Peter_Nerlich.jpg", "wall_clock", "objects",
     L_LOMIRI.format(lic="CC-BY-SA-4.0", author="Peter Nerlich")),
    ("lomiri-wallpapers-16.04", BG + "friends_by_Aitzol_Berasategi.jpg", "dogs", "animals",
     L_LOMIRI.format(lic="CC-BY-4.0", author="Aitzol Berasategi")),
    ("lomiri-wallpapers-16.04", BG + "life_by_Aitzol_Berasategi.jpg", "forest_stream",
     "landscapes", L_LOMIRI.format(lic="CC-BY-4.0", author="Aitzol Berasategi")),
    ("lomiri-wallpapers-16.04", BG + "picosdeeuropa_by_Aitzol_Berasategi.jpg", "mountains",
     "landscapes", L_LOMIRI.format(lic="CC-BY-4.0", author="Aitzol Berasategi")),
    ("lomiri-wallpapers-16.04", BG + "seeding_by_Clements_Engelhardt.jpg", "dandelions",
     "plants", L_LOMIRI.format(lic="CC0-1.0", author="Clemens Engelhardt")),
    ("lomiri-wallpapers-16.04", BG + "sunset_by_Aitzol_Berasategi.jpg", "sunset", "landscapes",
     L_LOMIRI.format(lic="CC-BY-4.0", author="Aitzol Berasategi")),
    ("lomiri-wallpapers-20.04", BG + "Kleiber_by_Lukas_Baubkus.jpg", "nuthatch", "animals",
     "CC-BY-SA-3.0 (Lukas Baubkus, 2021; lomiri-wallpapers-20.04 debian/copyright)"),
    # mate-backgrounds (nature)
    ("mate-backgrounds", MATE + "Aqua.jpg", "water_drop", "objects",
     L_MATE.format(author="Charles Barbin")),
    ("mate-backgrounds", MATE + "Blinds.jpg", "green_leaf", "plants",
     L_MATE.format(author="Lennart Poettering, Andrea Cimitan")),
    ("mate-backgrounds", MATE + "Dune.jpg", "dune_grass", "landscapes",
     L_MATE.format(author="Marco Cogoni, Hylke Bons")),
    ("mate-backgrounds", MATE + "FreshFlower.jpg", "orange_flower", "plants",
     L_MATE.format(author="Jens Ansorg")),
    ("mate-backgrounds", MATE + "Garden.jpg", "marigold", "plants",
     L_MATE.format(author="Charles Barbin")),
    ("mate-backgrounds", MATE + "GreenMeadow.jpg", "grass", "plants",
     L_MATE.format(author="Timothy Schellhase, Lapo Calamandrei")),
    ("mate-backgrounds", MATE + "LadyBird.jpg", "ladybird", "animals",
     L_MATE.format(author="Charles Barbin")),
    ("mate-backgrounds", MATE + "RainDrops.jpg", "wet_leaves", "plants",
     L_MATE.format(author='"blackcombwhistler07"')),
    ("mate-backgrounds", MATE + "Storm.jpg", "storm_sea", "landscapes",
     L_MATE.format(author="Sergey Nazarov")),
    ("mate-backgrounds", MATE + "TwoWings.jpg", "flower_seed", "plants",
     L_MATE.format(author="Charles Barbin, Hylke Bons")),
    ("mate-backgrounds", MATE + "Wood.jpg", "wood_grain", "objects",
     L_MATE.format(author="Jean-François Fortin Tam")),
    ("mate-backgrounds", MATE + "YellowFlower.jpg", "yellow_flower", "plants",
     L_MATE.format(author="Charles Barbin")),
    # darknet
    ("darknet", DK + "dog.jpg", "dog_bicycle", "animals", L_DARKNET),
    ("darknet", DK + "eagle.jpg", "eagle", "animals", L_DARKNET),
    ("darknet", DK + "giraffe.jpg", "giraffe_zebra", "animals", L_DARKNET),
    ("darknet", DK + "horses.jpg", "horses", "animals", L_DARKNET),
    ("darknet", DK + "kite.jpg", "beach_kites", "landscapes", L_DARKNET),
    ("darknet", DK + "person.jpg", "person_dog_horse", "people", L_DARKNET),
    # palapeli-data (licence/author from the puzzle .desktop files)
    ("palapeli-data", PAL + "castle-maintenon.jpg", "castle", "buildings",
     "GFDL (Eric Pouhier, Wikimedia Commons EPO_2432_wiki.jpg; palapeli-data)"),
    ("palapeli-data", PAL + "cincinnati-bridge.jpg", "suspension_bridge", "buildings",
     "Public Domain (Derek Jensen, Wikimedia Commons; palapeli-data)"),
    ("palapeli-data", PAL + "citrus-fruits.jpg", "citrus_fruits", "food",
     "Public Domain (US Department of Agriculture, Wikimedia Commons; palapeli-data)"),
    ("palapeli-data", PAL + "european-honey-bee.jpg", "honey_bee", "animals",
     "Public Domain (John Severns, Wikimedia Commons; palapeli-data)"),
    ("palapeli-data", PAL + "panther-chameleon-female.jpg", "chameleon", "animals",
     "GFDL (B. Navez and others, Wikimedia Commons FurciferPardalisFemale.JPG; palapeli-data)"),
    # gnome-control-center-data avatar photos (512x512)
    ("gnome-control-center-data", GF + "bicycle.jpg", "bicycle_marking", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "book.jpg", "book", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "calculator.jpg", "calculator", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "cat.jpg", "cat", "animals", L_GNOME),
    ("gnome-control-center-data", GF + "coffee2.jpg", "latte", "food", L_GNOME),
    ("gnome-control-center-data", GF + "flower2.jpg", "lily", "plants", L_GNOME),
    ("gnome-control-center-data", GF + "gamepad.jpg", "gamepad", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "guitar2.jpg", "bass_guitar", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "headphones.jpg", "headphones", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "hummingbird.jpg", "hummingbird", "animals", L_GNOME),
    ("gnome-control-center-data", GF + "mountain.jpg", "volcano_dusk", "landscapes", L_GNOME),
    ("gnome-control-center-data", GF + "plane.jpg", "airplane_wing", "objects", L_GNOME),
    ("gnome-control-center-data", GF + "surfer.jpg", "surfer", "people", L_GNOME),
    ("gnome-control-center-data", GF + "tomatoes.jpg", "tomatoes", "food", L_GNOME),
    ("gnome-control-center-data", GF + "tree.jpg", "tree_field", "plants", L_GNOME),
    # plasma-workspace-wallpapers (photographic ones only)
    ("plasma-workspace-wallpapers", plasma("BytheWater"), "lake_jetty", "landscapes",
     L_PLASMA.format(author="Maciej Wiklo")),
    ("plasma-workspace-wallpapers", plasma("ColdRipple"), "pier_fog", "landscapes",
     L_PLASMA.format(author="Risto Saukonpää")),
    ("plasma-workspace-wallpapers", plasma("ColorfulCups"), "paper_cups", "objects",
     L_PLASMA.format(author="Dmitri Popov")),
    ("plasma-workspace-wallpapers", plasma("EveningGlow"), "rowing_boats", "landscapes",
     L_PLASMA.format(author="Ian Hex")),
    ("plasma-workspace-wallpapers", plasma("FallenLeaf"), "autumn_leaf", "plants",
     L_PLASMA.format(author="Martin Klapetek")),
    ("plasma-workspace-wallpapers", plasma("Grey"), "facade", "buildings",
     L_PLASMA.format(author="Sigi Sagi")),
    ("plasma-workspace-wallpapers", plasma("Kite"), "sky_kite", "landscapes",
     L_PLASMA.format(author="Risto Saukonpää")),
    ("plasma-workspace-wallpapers", plasma("OneStandsOut"), "moss", "plants",
     L_PLASMA.format(author="Risto Saukonpää")),
    ("plasma-workspace-wallpapers", plasma("Path"), "forest_path", "landscapes",
     L_PLASMA.format(author="Risto Saukonpää")),
    ("plasma-workspace-wallpapers", plasma("summer_1am"), "lake_dusk", "landscapes",
     L_PLASMA.format(author="Risto Saukonpää")),
    # dde-account-faces (200x200 Unsplash photos)
    ("dde-account-faces", DDE + "1.png", "gerbera", "plants", L_DDE),
    ("dde-account-faces", DDE + "10.png", "clock_face", "objects", L_DDE),
    ("dde-account-faces", DDE + "11.png", "piano_keys", "objects", L_DDE),
    ("dde-account-faces", DDE + "12.png", "kitten", "animals", L_DDE),
    ("dde-account-faces", DDE + "13.png", "horse_head", "animals", L_DDE),
    ("dde-account-faces", DDE + "14.png", "leopard", "animals", L_DDE),
    ("dde-account-faces", DDE + "2.png", "ladybirds", "animals", L_DDE),
    ("dde-account-faces", DDE + "3.png", "butterfly", "animals", L_DDE),
    ("dde-account-faces", DDE + "4.png", "macaw", "animals", L_DDE),
    ("dde-account-faces", DDE + "6.png", "balloons", "objects", L_DDE),
    ("dde-account-faces", DDE + "7.png", "ring", "objects", L_DDE),
    ("dde-account-faces", DDE + "8.png", "heart_cushion", "objects", L_DDE),
    # opencv-doc sample data (photographs only; lena is not in Debian's package,
    # baboon/messi/graffiti/middlebury images deliberately skipped)
    ("opencv-doc", OCV + "alphamat/input_images/plant.jpg", "potted_plant", "plants", L_OPENCV),
    ("opencv-doc", OCV + "data/aero1.jpg", "aerial_town", "landscapes", L_OPENCV),
    ("opencv-doc", OCV + "data/aloeL.jpg", "aloe", "plants", L_OPENCV),
    ("opencv-doc", OCV + "data/apple.jpg", "apple", "food", L_OPENCV),
    ("opencv-doc", OCV + "data/blox.jpg", "wooden_blocks", "objects", L_OPENCV),
    ("opencv-doc", OCV + "data/board.jpg", "circuit_board", "objects", L_OPENCV),
    ("opencv-doc", OCV + "data/box_in_scene.png", "boxes", "objects", L_OPENCV),
    ("opencv-doc", OCV + "data/building.jpg", "hotel", "buildings", L_OPENCV),
    ("opencv-doc", OCV + "data/butterfly.jpg", "swallowtail", "animals", L_OPENCV),
    ("opencv-doc", OCV + "data/chicky_512.png", "pekingese", "animals", L_OPENCV),
    ("opencv-doc", OCV + "data/left.jpg", "books", "objects", L_OPENCV),
    ("opencv-doc", OCV + "data/ela_original.jpg", "notebook", "objects", L_OPENCV),
    ("opencv-doc", OCV + "data/fruits.jpg", "fruit", "food", L_OPENCV),
    ("opencv-doc", OCV + "data/home.jpg", "palace", "buildings", L_OPENCV),
    ("opencv-doc", OCV + "data/leuvenA.jpg", "street", "buildings", L_OPENCV),
    ("opencv-doc", OCV + "data/orange.jpg", "orange", "food", L_OPENCV),
    ("opencv-doc", OCV + "data/squirrel_cls.jpg", "squirrel", "animals", L_OPENCV),
    ("opencv-doc", OCV + "data/stuff.jpg", "desk_items", "objects", L_OPENCV),
    ("opencv-doc", OCV + "hfs/data/000.jpg", "robin", "animals", L_OPENCV),
    ("opencv-doc", OCV + "hfs/data/001.jpg", "lake", "landscapes", L_OPENCV),
    ("opencv-doc", OCV + "hfs/data/002.jpg", "lone_tree", "plants", L_OPENCV),
    ("opencv-doc", OCV + "reg/home.png", "brick_house", "buildings", L_OPENCV),
    # lxqt-themes wallpapers
    ("lxqt-themes", LXQT + "Butterfly-Kenneth-Wimer.jpg", "butterfly_seedheads", "animals",
     L_LXQT.format(extra="; photo credited to Kenneth Wimer in file name")),
    ("lxqt-themes", LXQT + "Valendas.png", "valley", "landscapes", L_LXQT.format(extra="")),
    ("lxqt-themes", LXQT + "after-the-rain.jpg", "mountain_clouds", "landscapes",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "appleflower.png", "apple_blossom", "plants",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "beam.png", "sunbeams", "landscapes",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "butterfly.png", "butterfly_thistle", "animals",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "cloud.png", "cloudy_sky", "landscapes", L_LXQT.format(extra="")),
    ("lxqt-themes", LXQT + "drop.png", "grass_drop", "plants",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "flowers.png", "wildflowers", "plants",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "fog.jpg", "foggy_field", "landscapes",
     L_LXQT.format(extra="; photo by stefonarch")),
    ("lxqt-themes", LXQT + "this-is-not-windows.jpg", "rolling_hills", "landscapes",
     L_LXQT.format(extra="; photo by stefonarch")),
    # enlightenment-data backgrounds (Edje archives, decoded with edje_decc)
    ("enlightenment-data", EBG + "Bamboo.edj#img.png", "bamboo", "plants", L_E),
    ("enlightenment-data", EBG + "Foggy-Trees.edj#img.png", "foggy_trees", "landscapes", L_E),
    ("enlightenment-data", EBG + "God-Rays.edj#img.png", "god_rays", "landscapes", L_E),
    ("enlightenment-data", EBG + "Green-Maple.edj#img.png", "green_maple", "plants", L_E),
    ("enlightenment-data", EBG + "Lichen-Branches.edj#img.png", "lichen", "plants", L_E),
    ("enlightenment-data", EBG + "Mountain.edj#img.png", "mountain_night", "landscapes", L_E),
    ("enlightenment-data", EBG + "Peaks.edj#img.png", "peaks", "landscapes", L_E),
    ("enlightenment-data", EBG + "Red-Maple.edj#img.png", "red_maple", "plants", L_E),
    ("enlightenment-data", EBG + "Sea-of-Lanterns.edj#img.png", "lanterns", "objects", L_E),
    ("enlightenment-data", EBG + "Snow-Trees.edj#img.png", "snow_trees", "landscapes", L_E),
    ("enlightenment-data", EBG + "Spruce-Needles.edj#img.png", "spruce", "plants", L_E),
    ("enlightenment-data", EBG + "Sunset-Clouds.edj#img.png", "sunset_clouds", "landscapes", L_E),
    ("enlightenment-data", EBG + "Sunset-Hills.edj#img.png", "hazy_hills", "landscapes", L_E),
    ("enlightenment-data", EBG + "White-Flower.edj#img.png", "frangipani", "plants", L_E),
    ("enlightenment-data", EBG + "Yellow-Flower.edj#img.png", "yellow_blossom", "plants", L_E),
    # gimp-help-en example originals
    ("gimp-help-en", GH + "taj_orig.jpg", "taj_mahal", "buildings", L_GIMP),
    ("gimp-help-en", GH + "enhance/high-pass-origin.png", "chimpanzee", "animals", L_GIMP),
    ("gimp-help-en", GH + "kvitveis-orig.png", "wood_anemone", "plants", L_GIMP),
    ("gimp-help-en", GH + "colors-retinex1.png", "floppy_disks", "objects", L_GIMP),
    ("gimp-help-en", GH + "blur/mean_curvature-ex-1.jpg", "rose", "plants", L_GIMP),
    # PyPI wheels
    ("pypi:scikit-image", "skimage/data/chelsea.png", "cat_chelsea", "animals",
     "CC0 (Stefan van der Walt; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/coffee.png", "coffee_cup", "food",
     "CC0 (Rachel Michetti; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/rocket.jpg", "rocket_launch", "objects",
     "Public Domain (SpaceX; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/coins.png", "coins", "objects",
     "No known copyright restrictions (Greek coins, Brooklyn Museum; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/grass.png", "grass_texture", "plants",
     "CC0 (CC0Textures; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/brick.png", "brick_wall", "buildings",
     "CC0 (CC0Textures Bricks25; skimage.data docstring)"),
    ("pypi:scikit-image", "skimage/data/gravel.png", "gravel", "objects",
     "CC0 (CC0Textures Gravel04; skimage.data docstring)"),
    ("pypi:scikit-learn", "sklearn/datasets/images/china.jpg", "temple", "buildings",
     "CC-BY-2.0 (danielbuechele on Flickr; sklearn/datasets/images/README.txt)"),
    ("pypi:scikit-learn", "sklearn/datasets/images/flower.jpg", "flower_closeup", "plants",
     "CC-BY-2.0 (vultilion on Flickr; sklearn/datasets/images/README.txt)"),
]

# ---------------------------------------------------------------- faces
# Real photos of people: (package, path, box or None for Haar, subject, licence)
# box = (x0, y0, x1, y1) square around the face in original pixel coordinates.
FACE_PHOTOS: list[tuple[str, str, tuple[int, int, int, int] | None, str]] = [
    ("pypi:scikit-image", "skimage/data/astronaut.png", None,
     "Public Domain (NASA, Eileen Collins; skimage.data docstring)"),
    ("pypi:matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", None,
     "Public Domain (US Navy photo of Grace Hopper; matplotlib sample data)"),
    ("pypi:scikit-image", "skimage/data/camera.png", (150, 55, 285, 190),
     "CC0 (Lav Varshney; skimage.data docstring)"),
    ("opencv-doc", OCV + "data/basketball1.png", None, L_OPENCV),
]
LFW_LICENSE = ("LFW dataset via scikit-image data (research use; see "
               "http://vis-www.cs.umass.edu/lfw/)")


# ---------------------------------------------------------------- helpers
def site_packages() -> Path:
    import skimage
    return Path(skimage.__file__).resolve().parents[1]


def edj_image(debroot: Path, edj_cache: Path, edj_path: str, member: str) -> Path:
    src = debroot / "enlightenment-data" / edj_path.lstrip("/")
    name = Path(edj_path).stem
    out_dir = edj_cache / name
    target = out_dir / member
    if not target.exists():
        if shutil.which("edje_decc") is None:
            sys.exit("edje_decc not found: apt-get install libedje-bin")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["edje_decc", str(src), "-output", str(out_dir)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return target


def resolve(pkg: str, path: str, debroot: Path, edj_cache: Path) -> tuple[Path, str]:
    """Return (local file, manifest source string)."""
    if pkg.startswith("pypi:"):
        return site_packages() / path, f"{pkg}:{path}"
    if "#" in path:
        edj, member = path.split("#", 1)
        return edj_image(debroot, edj_cache, edj, member), f"debian:{pkg}:{edj}#{member}"
    local = debroot / pkg / path.lstrip("/")
    if path.endswith("/"):  # plasma wallpaper folder: take the largest image
        cands = sorted(p for p in local.iterdir() if p.suffix.lower() in (".jpg", ".png"))
        best = max(cands, key=lambda p: (Image.open(p).size[0] * Image.open(p).size[1], p.name))
        return best, f"debian:{pkg}:{path}{best.name}"
    return local, f"debian:{pkg}:{path}"


def load_rgb(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def square_256(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = VARIETY_SIZE / min(w, h)
    nw, nh = max(VARIETY_SIZE, round(w * s)), max(VARIETY_SIZE, round(h * s))
    im = im.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    x0, y0 = (nw - VARIETY_SIZE) // 2, (nh - VARIETY_SIZE) // 2
    return im.crop((x0, y0, x0 + VARIETY_SIZE, y0 + VARIETY_SIZE))


def haar_box(im: Image.Image) -> tuple[int, int, int, int]:
    import cv2
    casc = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    g = np.asarray(im.convert("L"))
    faces = casc.detectMultiScale(g, 1.1, 5, minSize=(24, 24))
    if len(faces) == 0:
        raise RuntimeError("no face found")
    x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: (f[2] * f[3], f))
    cx, cy, side = x + w / 2, y + h / 2, w * 1.6  # include hair/chin margin
    return (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))


def face_crop(im: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    x0, y0, x1, y1 = box
    side = min(x1 - x0, im.size[0], im.size[1])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0 = int(min(max(cx - side / 2, 0), im.size[0] - side))
    y0 = int(min(max(cy - side / 2, 0), im.size[1] - side))
    return im.crop((x0, y0, x0 + side, y0 + side)).resize((FACE_SIZE, FACE_SIZE), Image.LANCZOS)


class Deduper:
    def __init__(self) -> None:
        import imagehash
        self._ih = imagehash
        self.hashes: list = []
        self.thumbs: list[np.ndarray] = []
        self.names: list[str] = []

    def check_add(self, im: Image.Image, name: str) -> str | None:
        h = self._ih.phash(im)
        t = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32)
        for h2, t2, n2 in zip(self.hashes, self.thumbs, self.names):
            if h - h2 <= PHASH_MAX_DIST or float(np.abs(t - t2).mean()) < THUMB_MAD_MAX:
                return n2
        self.hashes.append(h)
        self.thumbs.append(t)
        self.names.append(name)
        return None


def write_manifest(folder: Path, rows: list[dict]) -> None:
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["file", "subject", "category", "source", "license",
                                          "original_size"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debroot", type=Path, default=Path("/tmp/debroot"),
                    help="folder holding one extracted .deb per package name")
    ap.add_argument("--edj-cache", type=Path, default=Path("/tmp/edj"),
                    help="where edje_decc unpacks enlightenment backgrounds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    vdir, fdir = args.out / "variety", args.out / "faces"
    for d in (vdir, fdir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    dedup = Deduper()
    skipped: list[str] = []

    # ---- faces from real photos first (so their sources are never re-used)
    face_rows: list[dict] = []
    for pkg, path, box, lic in FACE_PHOTOS:
        local, source = resolve(pkg, path, args.debroot, args.edj_cache)
        im = load_rgb(local)
        crop = face_crop(im, box or haar_box(im))
        dup = dedup.check_add(crop, source)
        if dup:
            skipped.append(f"{source} (duplicate of {dup})")
            continue
        fn = f"{len(face_rows) + 1:03d}_face.jpg"
        crop.save(fdir / fn, quality=92, optimize=True)
        face_rows.append(dict(file=fn, subject="face", category="people", source=source,
                              license=lic, original_size=f"{im.size[0]}x{im.size[1]}"))

    # ---- variety
    rows: list[dict] = []
    for pkg, path, subject, cat, lic in VARIETY:
        local, source = resolve(pkg, path, args.debroot, args.edj_cache)
        im = load_rgb(local)
        out = square_256(im)
        dup = dedup.check_add(out, source)
        if dup:
            skipped.append(f"{source} (duplicate of {dup})")
            continue
        fn = f"{len(rows) + 1:03d}_{subject}.jpg"
        out.save(vdir / fn, quality=90, optimize=True)
        rows.append(dict(file=fn, subject=subject, category=cat, source=source, license=lic,
                         original_size=f"{im.size[0]}x{im.size[1]}"))

    # ---- LFW subset faces (25x25 greyscale) to fill the faces set
    import skimage.data
    lfw = skimage.data.lfw_subset()[:100]  # the first 100 are faces
    for i, arr in enumerate(lfw):
        a = np.asarray(arr)
        if a.dtype != np.uint8:
            a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L").convert("RGB")
        up = im.resize((FACE_SIZE, FACE_SIZE), Image.BICUBIC)
        source = f"pypi:scikit-image:skimage/data/lfw_subset.npy#{i}"
        dup = dedup.check_add(up, source)
        if dup:
            skipped.append(f"{source} (duplicate of {dup})")
            continue
        fn = f"{len(face_rows) + 1:03d}_face.jpg"
        up.save(fdir / fn, quality=92, optimize=True)
        face_rows.append(dict(file=fn, subject="face", category="people", source=source,
                              license=LFW_LICENSE, original_size="25x25"))

    write_manifest(vdir, rows)
    write_manifest(fdir, face_rows)

    from collections import Counter
    print(f"variety: {len(rows)}  {dict(sorted(Counter(r['category'] for r in rows).items()))}")
    print(f"faces:   {len(face_rows)}  (real photo crops: "
          f"{sum(1 for r in face_rows if 'lfw' not in r['source'])})")
    print(f"skipped as duplicates: {len(skipped)}")
    for s in skipped:
        print("  -", s)


if __name__ == "__main__":
    main()
