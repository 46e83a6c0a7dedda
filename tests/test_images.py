"""Image reading: every common mode becomes upright 8-bit RGB; bad files get clear errors."""
import numpy as np
import pytest
from PIL import Image

from lorafind_utils.core.images import ImageError, load_rgb, read_base_set


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    out = np.asarray(load_rgb(tmp_path / "x.png"))
    assert out.shape == (4, 4, 3)
    assert (out[0, 0] == [255, 0, 0]).all() and (out[3, 0] == [255, 255, 255]).all()


def test_greyscale_and_16bit(tmp_path):
    Image.fromarray(np.full((3, 3), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (np.asarray(load_rgb(tmp_path / "g.png")) == 77).all()
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "h.png")
    assert (np.asarray(load_rgb(tmp_path / "h.png")) == 255).all()
    Image.fromarray(np.full((3, 3), 32768, np.uint16)).save(tmp_path / "m.png")
    assert abs(int(np.asarray(load_rgb(tmp_path / "m.png"))[0, 0, 0]) - 128) <= 1


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (2, 6)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = np.asarray(load_rgb(tmp_path / "c.jpg"))[0, 0]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not an image at all", "not a readable image")])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=match):
        load_rgb(p)


def test_truncated_and_huge(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:60])
    with pytest.raises(ImageError):
        load_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="too large"):
        load_rgb(tmp_path / "t.png", max_pixels=100)


def test_manifest_must_match_folder(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        read_base_set(tmp_path)
    (tmp_path / "manifest.csv").write_text(
        "file,subject,category,source,license\na.jpg,x,objects,test,CC0\nc.jpg,y,objects,test,CC0\n"
    )
    with pytest.raises(ValueError, match=r"missing \(e.g. \['c.jpg'\]\).*not listed \(e.g. \['b.jpg'\]\)"):
        read_base_set(tmp_path)
