"""The shared preprocessing: every odd or broken file either decodes to RGB or gives a short reason."""

import dataclasses
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from toolkit.core import formats, images


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    p = images.load(_save(rgba, tmp_path / "a.png"), images.Preprocess(8))
    assert p.shape == (8, 8, 3) and (p == 255).all()  # alpha composited over white

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert tuple(images.load(_save(pal, tmp_path / "p.png", transparency=0), images.Preprocess(8))[0, 0]) == (10, 200, 30)

    la = Image.new("LA", (8, 8), (100, 255))
    assert tuple(images.load(_save(la, tmp_path / "la.png"), images.Preprocess(8))[0, 0]) == (100, 100, 100)

    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert grey16.mode.startswith("I")
    assert (images.load(_save(grey16, tmp_path / "g16.png"), images.Preprocess(8)) == 255).all()

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = images.load(_save(cmyk, tmp_path / "c.jpg", quality=100), images.Preprocess(8))[4, 4]
    assert r > 200 and g < 60 and b < 60


def test_first_frame_of_animations(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = images.load(tmp_path / "anim.gif", images.Preprocess(8))[0, 0]
    assert r > 200 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = images.open_rgb(tmp_path / "o.jpg")
    assert out.size == (10, 20)
    a = np.asarray(out).mean(2)
    assert a[:10].mean() > 200 and a[10:].mean() < 50  # the white half is now on top


def test_resize_policies():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left quarter
    crop = images.resize(img, images.Preprocess(10, "center_crop"))
    squash = images.resize(img, images.Preprocess(10, "squash"))
    assert crop.shape == squash.shape == (10, 10, 3)
    assert crop[:, 0].mean() < 40  # the centre crop cut the white quarter away
    assert squash[:, 0].mean() > 200  # squashing keeps it
    same = np.asarray(Image.new("RGB", (10, 10), (1, 2, 3)))
    assert (images.resize(Image.fromarray(same), images.Preprocess(10)) == same).all()  # right size: pixels untouched


@pytest.mark.parametrize("name, make, reason", [
    ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
    ("text.jpg", lambda p: p.write_text("hello, not an image"), "not an image"),
    ("noise.png", lambda p: p.write_bytes(os.urandom(2048)), "not an image"),
    ("dir.jpg", lambda p: p.mkdir(), "is a folder"),
    ("dangling.png", lambda p: p.symlink_to(p.parent / "missing.png"), "missing or dangling link"),
])
def test_bad_files_give_short_reasons(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(images.DecodeError, match=reason):
        images.load(path, images.Preprocess(8))


def test_truncated_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.DecodeError, match="corrupt image|truncated"):
        images.load(tmp_path / "t.png", images.Preprocess(8))


def test_pixel_cap_is_checked_from_the_header(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(images.DecodeError, match="too many pixels"):
        images.open_rgb(tmp_path / "big.png", max_pixels=5000)
    assert not loaded  # refused before any pixel data was decoded


def test_unreadable_file(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "locked.png")

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(images.DecodeError, match="permission denied"):
        images.load(tmp_path / "locked.png", images.Preprocess(4))


def test_walk_is_deterministic_recursive_and_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "b/1.jpg", "a.JpEg", "c/d/e.webp", "notes.txt", ".hidden.png", "z.gif",
                "folder.png/inner.bmp", ".git/x.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "b")  # symlinked folders are not followed
    # a folder's files in name order (a folder named like an image included), then its subfolders
    assert images.find_images(tmp_path) == ["a.JpEg", "folder.png", "z.gif", "b/1.jpg", "b/2.PNG", "c/d/e.webp",
                                            "folder.png/inner.bmp"]
    assert list(images.iter_images(tmp_path)) == images.find_images(tmp_path)
    skipped = Counter()
    images.find_images(tmp_path, skipped)  # the symlinked folder is counted as such, not as a file
    assert dict(skipped) == {".txt": 1, formats.LINKED_FOLDER: 1}
    assert formats.describe_skipped(skipped) == ("1 file(s): .txt 1 (not an image format this decoder reads); "
                                                 "1 symlinked folder(s), not followed")



@pytest.mark.parametrize("root", ["d", "d/", "./d", "d/../d", "/", ".", "", "d//e", "/tmp/x/../d"])
def test_per_folder_path_helpers_give_exactly_what_os_path_and_pathlib_give(root, monkeypatch, tmp_path):
    # The data and cache fingerprints are built from these strings: a different spelling would make every
    # existing cache entry and resume state look as if its data had changed.
    from pathlib import Path

    from toolkit.core import folders

    monkeypatch.chdir(tmp_path)
    rels = ["a/x.png", "a/y.png", "b/c/z.png", "b/c/..x.png", "w.png"]
    files = folders.under(root or ".", rels)
    assert files == [str(Path(root or ".") / r) for r in rels]
    assert folders.abspaths(files) == [os.path.abspath(f) for f in files]
    for start in (".", "d", "/", "d/a", os.getcwd(), "/tmp"):
        assert folders.relpaths(files, start) == [os.path.relpath(f, start) for f in files]


def test_the_old_import_path_keeps_the_old_signatures(tmp_path):
    # scripts written before the package layout call toolkit.images.load(path, size, ...) (e.g. the fp16 check)
    import toolkit.images as old
    from toolkit.core.meta import Preprocess

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    assert np.array_equal(old.load(path, 16), images.load(path, Preprocess(16)))
    assert np.array_equal(old.load(path, 16, "squash", interpolation="bicubic"),
                          images.load(path, Preprocess(16, "squash", interpolation="bicubic")))
    with Image.open(path) as img:
        assert np.array_equal(old.resize(img.convert("RGB"), 12, "squash"),
                              images.resize(img.convert("RGB"), Preprocess(12, "squash")))
    with pytest.raises(images.DecodeError):
        old.load(path, 16, max_pixels=100)


def test_decode_batches_keeps_order_and_reports_each_file(tmp_path):
    rng = np.random.default_rng(0)
    names = []
    for i in range(150):
        name = f"{i:03d}.png"
        if i % 37 == 5:
            (tmp_path / name).write_bytes(b"broken")
        else:
            Image.fromarray(np.full((9, 7, 3), i, dtype=np.uint8)).save(tmp_path / name)
        names.append(name)
    rng.shuffle(names)
    for workers in (1, 2):
        batches = list(images.decode_batches(tmp_path, iter(names), images.Preprocess(4, "squash"), batch_size=16, workers=workers))
        assert [p for b in batches for p in b.paths] == names
        for b in batches:
            good = [int(p[:3]) for p, ok in zip(b.paths, b.ok) if ok]
            assert [int(px[0, 0, 0]) for px in b.pixels] == good  # each decoded image is its own file's
            assert {b.paths[i] for i in b.errors} == {p for p, ok in zip(b.paths, b.ok) if not ok}
            assert all(r == "not an image" for r in b.errors.values())


def test_a_thin_image_does_not_blow_up_memory(tmp_path):
    import resource
    import time

    Image.new("L", (1, 3_000_000), 200).save(tmp_path / "thin.png")  # a few KB on disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = images.load(tmp_path / "thin.png", images.Preprocess(32))
    assert out.shape == (32, 32, 3) and (out == 200).all()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb  # resizing the whole strip first would take about 9 GB
    assert time.perf_counter() - start < 10


def test_dark_16_bit_images_stay_dark(tmp_path):
    dark = Image.fromarray(np.full((8, 8), 256, dtype=np.uint16))  # 256 of 65535: nearly black
    assert dark.mode.startswith("I;16")
    dark.save(tmp_path / "dark16.png")
    assert images.load(tmp_path / "dark16.png", images.Preprocess(8)).max() <= 1


def test_very_deep_folders_are_walked(tmp_path):
    levels = 1100  # past Python's recursion limit
    deep = tmp_path
    for _ in range(levels):  # os.makedirs itself recurses
        deep = deep / "d"
        deep.mkdir()
    (deep / "x.png").write_bytes(b"x")
    (tmp_path / "top.png").write_bytes(b"x")
    found = images.find_images(tmp_path)
    assert found == ["top.png", "/".join(["d"] * levels) + "/x.png"]
    (deep / "x.png").unlink()
    for _ in range(levels):  # and so does rmtree: leave nothing deep behind
        deep.rmdir()
        deep = deep.parent


def _keyed(mode: str, path):
    """A 16x16 picture whose border is transparent and whose centre is opaque, with transparency
    stored the way `mode` stores it; -> (path, expected centre pixel)."""
    centre = (4, 4, 12, 12)
    if mode == "RGBA":
        im = Image.new("RGBA", (16, 16), (255, 0, 255, 0))
        im.paste((10, 20, 30, 255), centre)
        return _save(im, path), (10, 20, 30)
    if mode == "LA":
        im = Image.new("LA", (16, 16), (0, 0))
        im.paste((128, 255), centre)
        return _save(im, path), (128, 128, 128)
    if mode in ("P", "GIF"):
        im = Image.new("P", (16, 16), 0)
        im.putpalette([255, 0, 255, 10, 20, 30] + [0] * 762)
        im.paste(1, centre)
        return _save(im, path, transparency=0), (10, 20, 30)
    if mode == "RGB":  # PNG colour type 2 + tRNS colour key
        im = Image.new("RGB", (16, 16), (255, 0, 255))
        im.paste((10, 20, 30), centre)
        return _save(im, path, transparency=(255, 0, 255)), (10, 20, 30)
    if mode == "L":  # PNG colour type 0 + tRNS grey key
        im = Image.new("L", (16, 16), 0)
        im.paste(128, centre)
        return _save(im, path, transparency=0), (128, 128, 128)
    if mode == "1":
        im = Image.new("1", (16, 16), 0)
        im.paste(1, centre)
        return _save(im, path, transparency=0), (255, 255, 255)
    if mode == "I;16":  # 16-bit grey + a 16-bit tRNS key
        a = np.full((16, 16), 1000, np.uint16)
        a[4:12, 4:12] = 30000
        return _save(Image.fromarray(a), path, transparency=1000), (117, 117, 117)  # 30000 / 257
    if mode == "WEBP":
        im = Image.new("RGBA", (16, 16), (255, 0, 255, 0))
        im.paste((10, 20, 30, 255), centre)
        return _save(im, path, lossless=True), (10, 20, 30)
    raise ValueError(mode)


@pytest.mark.parametrize("mode, ext", [("RGBA", "png"), ("LA", "png"), ("P", "png"), ("GIF", "gif"), ("RGB", "png"),
                                       ("L", "png"), ("1", "png"), ("I;16", "png"), ("WEBP", "webp")])
def test_every_kind_of_transparency_is_composited_over_white(tmp_path, mode, ext):
    path, centre = _keyed(mode, tmp_path / f"t.{ext}")
    px = images.load(path, images.Preprocess(16))
    assert tuple(px[0, 0]) == (255, 255, 255)  # the key colour (magenta, black, 1000) never leaks through
    assert tuple(px[8, 8]) == centre


def test_the_extension_list_is_what_the_decoder_reads(tmp_path):
    red = Image.new("RGB", (8, 8), (220, 30, 30))
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.ppm", "PPM"), ("d.pgm", "PPM"), ("e.tga", "TGA"),
                      ("f.JPG", "JPEG")):
        (red.convert("L") if name.endswith(".pgm") else red).save(tmp_path / name, fmt)
    for name in ("notes.txt", "labels.csv", "README", "clip.mpg"):  # not images (MPEG: PIL decodes no frame)
        (tmp_path / name).write_bytes(b"x")
    skipped = Counter()
    found = images.find_images(tmp_path, skipped)
    assert found == ["a.jfif", "b.jpe", "c.ppm", "d.pgm", "e.tga", "f.JPG"]
    assert dict(skipped) == {".txt": 1, ".csv": 1, "(none)": 1, ".mpg": 1}
    for name in found:  # red, or red in grey (the .pgm): 0.299 * 220 + 0.587 * 30 + 0.114 * 30
        assert images.load(tmp_path / name, images.Preprocess(8))[4, 4, 0] in (range(80, 95) if name.endswith(".pgm") else range(200, 240))


def test_tiffs_pil_cannot_decode_are_read_with_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    grad = np.linspace(0, 1, 16, dtype=np.float32)[None, :].repeat(16, 0)
    rgb = np.stack([grad, 1 - grad, np.full_like(grad, 0.5)], -1)  # float RGB in [0, 1], as microscopes write
    tifffile.imwrite(tmp_path / "float_rgb.tif", rgb)
    tifffile.imwrite(tmp_path / "planar.tif", (rgb * 65535).astype(np.uint16).transpose(2, 0, 1), planarconfig="separate",
                     photometric="rgb")
    tifffile.imwrite(tmp_path / "float_grey.tif", grad)  # PIL reads this one itself (mode F): the same rule
    squash = images.Preprocess(16, "squash")
    px = images.load(tmp_path / "float_rgb.tif", squash)
    assert tuple(px[0, 0]) == (0, 255, 128) and tuple(px[0, 15]) == (255, 0, 128)
    assert np.abs(images.load(tmp_path / "planar.tif", squash).astype(int) - px).max() <= 1  # 16-bit: PIL truncates
    assert tuple(images.load(tmp_path / "float_grey.tif", squash)[0, 15]) == (255, 255, 255)
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(images.DecodeError, match=r"^unsupported image format \(TIFF with 5 samples"):
        images.load(tmp_path / "five.tif", images.Preprocess(8))
    (tmp_path / "photo.jpg").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))  # a HEIC photo named .jpg
    with pytest.raises(images.DecodeError, match=r"^unsupported image format \(HEIC"):
        images.load(tmp_path / "photo.jpg", images.Preprocess(8))


def test_preprocess_comes_from_the_model_and_crosses_processes():
    """Preprocess.of takes the model's input contract and the caller's pixel cap; it pickles (process pools, Ray)."""
    import pickle

    from toolkit.core.meta import Meta

    meta = Meta("tutorial_net", ["a", "b"], 24, "squash", [0.5] * 3, [0.25] * 3, interpolation="bicubic")
    prep = images.Preprocess.of(meta, 5000)
    assert prep == images.Preprocess(24, "squash", 5000, "bicubic")
    assert images.Preprocess.of(meta).max_pixels == images.MAX_PIXELS
    assert pickle.loads(pickle.dumps(prep)) == prep
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.size = 32  # a shared setting is never changed in place
