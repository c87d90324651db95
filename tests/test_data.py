"""Tests for fod_app.data: hostile image files, masks, folders and the MVTec layout."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fod_app.data import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    MIN_TRAIN_IMAGES,
    DatasetError,
    ImageLoadError,
    check_enough_images,
    dataset_fingerprint,
    is_mvtec_layout,
    list_images,
    load_image,
    load_images,
    load_mask,
    load_mvtec_layout,
    names_for,
    prepare_image,
    resolve_training_images,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = DATASETS / "mvtec_bottle"
TILE = DATASETS / "magnetic_tile"

# The real data sets are required: a missing folder fails the tests instead of skipping them.
assert BOTTLE.is_dir() and TILE.is_dir(), f"real data sets not found in {DATASETS}"


def needs_data(func):  # kept as a marker for readability; never skips
    return func


def _png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit) with a tiny bogus data chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _two_colour(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return img


# --------------------------------------------------------------------------- load_image


@needs_data
def test_load_real_rgb_and_grey_images() -> None:
    bottle = load_image(BOTTLE / "train" / "good" / "000.png")
    assert bottle.mode == "RGB"
    assert bottle.size == (256, 256)
    assert bottle.info["fod_source_mode"] == "RGB"

    tile_path = list_images(TILE / "train" / "good")[0]
    tile = load_image(tile_path)
    arr = np.asarray(tile)
    assert tile.mode == "RGB"
    assert tile.info["fod_source_mode"] == "L"
    assert np.array_equal(arr[..., 0], arr[..., 1])
    assert np.array_equal(arr[..., 0], np.asarray(Image.open(tile_path)))


@needs_data
def test_load_from_bytes_and_file_object_uses_given_name() -> None:
    raw = (BOTTLE / "train" / "good" / "000.png").read_bytes()
    assert load_image(raw, name="x.png").size == (256, 256)
    upload = io.BytesIO(raw)
    upload.name = "upload.png"  # type: ignore[attr-defined]
    assert load_image(upload).size == (256, 256)
    with pytest.raises(ImageLoadError, match=r"^part-7\.png: the file is incomplete"):
        load_image(raw[: len(raw) // 2], name="part-7.png")


@needs_data
def test_truncated_png_is_refused(tmp_path: Path) -> None:
    raw = (BOTTLE / "train" / "good" / "000.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(ImageLoadError, match=r"^cut\.png: the file is incomplete \(truncated\)"):
        load_image(path)


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = _jpeg_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.jpg"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageLoadError, match=r"^cut\.jpg: the file is incomplete \(truncated\)"):
        load_image(path)


def test_truncation_setting_is_restored(tmp_path: Path) -> None:
    from PIL import ImageFile

    raw = _jpeg_bytes(Image.new("RGB", (64, 64), (10, 20, 30)))
    path = tmp_path / "cut.jpg"
    path.write_bytes(raw[: len(raw) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageLoadError, match="truncated"):
            load_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"^empty\.png: the file is empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"the file is empty \(0 bytes\)"):
        load_image(b"", name="up.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n", encoding="utf-8")
    with pytest.raises(ImageLoadError, match=r"^notes\.png: not a readable image.*PNG, JPEG"):
        load_image(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"^gone\.png: file not found"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match="this is a folder, not an image file"):
        load_image(tmp_path)


def test_16bit_grayscale_scaled_by_range_not_clipped() -> None:
    values = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode.startswith("I;16")
    out = np.asarray(load_image(_png_bytes(img16), name="depth.png"))
    assert out.dtype == np.uint8
    assert out[..., 0].min() == 0
    assert out[..., 0].max() == 255
    assert np.all(np.diff(out[..., 0].reshape(-1).astype(int)) >= 0)  # order kept
    assert len(np.unique(out)) > 200  # not clipped to a few levels


def test_32bit_int_and_float_images(tmp_path: Path) -> None:
    ints = Image.fromarray(np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 1000, mode="I")
    path = tmp_path / "int.tif"
    ints.save(path)
    out = np.asarray(load_image(path))
    assert (out.min(), out.max()) == (0, 255)
    floats = Image.fromarray(np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32))
    path = tmp_path / "float.tif"
    floats.save(path)
    out = np.asarray(load_image(path))
    assert (out.min(), out.max()) == (0, 255)
    flat = Image.fromarray(np.full((32, 32), 7.5, np.float32))
    path = tmp_path / "flat.tif"
    flat.save(path)
    assert np.asarray(load_image(path)).max() == 0


def test_cmyk_jpeg_becomes_rgb() -> None:
    red = Image.new("RGB", (32, 32), (220, 20, 20)).convert("CMYK")
    img = load_image(_jpeg_bytes(red, quality=95), name="cmyk.jpg")
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert img.mode == "RGB"
    assert img.info["fod_source_mode"] == "CMYK"
    assert r > 150 and g < 80 and b < 80


def test_rgba_transparent_pixels_become_black() -> None:
    rgba = Image.new("RGBA", (32, 32), (200, 100, 50, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 16, 32))
    arr = np.asarray(load_image(_png_bytes(rgba), name="alpha.png"))
    assert arr[5, 5].tolist() == [0, 0, 0]
    assert arr[5, 25].tolist() == [200, 100, 50]


def test_palette_with_transparency_and_other_modes() -> None:
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 255, 255, 0, 200, 0] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))
    arr = np.asarray(load_image(_png_bytes(pal, transparency=0), name="pal.png"))
    assert arr[5, 5].tolist() == [0, 0, 0]
    assert arr[5, 25].tolist() == [0, 200, 0]

    la = Image.new("LA", (32, 32), (180, 255))
    assert np.asarray(load_image(_png_bytes(la), name="la.png"))[0, 0].tolist() == [180] * 3
    one_bit = Image.new("1", (32, 32), 1)
    assert np.asarray(load_image(_png_bytes(one_bit), name="1bit.png"))[0, 0].tolist() == [255] * 3


def test_tiny_image_is_refused() -> None:
    with pytest.raises(ImageLoadError, match=r"^dot\.png: the image is too small \(1 x 1 pixels"):
        load_image(_png_bytes(Image.new("RGB", (1, 1))), name="dot.png")


def test_huge_dimensions_refused_before_decoding() -> None:
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"^huge\.png: the image is too large \(900 megapixels"):
        load_image(_png_header_only(30000, 30000), name="huge.png")
    # just above our own 80-megapixel limit but below Pillow's bomb limit
    side = int(MAX_PIXELS**0.5) + 10
    with pytest.raises(ImageLoadError, match=rf"too large \({side} x {side} = .*the limit is 80\)"):
        load_image(_png_header_only(side, side), name="big.png")
    assert time.perf_counter() - start < 2.0


def test_pillow_bomb_warning_becomes_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 = 4096 -> warning range
    with pytest.raises(ImageLoadError, match=r"^w\.png: the image is too large"):
        load_image(_png_bytes(Image.new("RGB", (64, 64))), name="w.png")


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    raw = _jpeg_bytes(_two_colour((40, 20)), exif=exif.tobytes(), quality=95)
    img = load_image(raw, name="phone.jpg")
    assert img.size == (20, 40)
    top = np.asarray(img)[3, 10]
    bottom = np.asarray(img)[36, 10]
    assert top[0] > 200 and top[2] < 60  # red half now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_and_multipage_tiff_use_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    tif = tmp_path / "pages.tiff"
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    assert Image.open(gif).n_frames == 3 and Image.open(tif).n_frames == 3
    assert np.asarray(load_image(gif))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(tif))[0, 0].tolist() == [255, 0, 0]


def test_unicode_and_non_utf8_file_names(tmp_path: Path) -> None:
    good = tmp_path / "Prüfteil_ß_日本.png"
    good.write_bytes(_png_bytes(Image.new("RGB", (32, 32), (1, 2, 3))))
    assert load_image(good).size == (32, 32)
    bad_name = os.fsdecode(b"bad_\xff\xfe.png")
    bad = tmp_path / bad_name
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    message = str(info.value)
    assert message.startswith("bad_\ufffd\ufffd.png: not a readable image")
    message.encode("utf-8")  # printable in any UI


# --------------------------------------------------------------------------- prepare / masks


def test_prepare_image_square_float_range() -> None:
    img = _two_colour((80, 30))
    arr = prepare_image(img, 64)
    assert arr.shape == (3, 64, 64)
    assert arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    expected = np.asarray(img.resize((64, 64), Image.Resampling.LANCZOS), np.float32) / 255
    assert np.allclose(arr, expected.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        prepare_image(img, 0)


@needs_data
def test_load_real_masks_including_all_zero() -> None:
    mask = load_mask(BOTTLE / "ground_truth" / "contamination" / "000_mask.png", 64)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert 0 < mask.sum() < mask.size
    empty = load_mask(TILE / "ground_truth" / "uneven" / "exp3_num_45042_mask.png", 128)
    assert empty.shape == (128, 128) and not empty.any()


def test_mask_resize_stays_binary_and_missing_mask(tmp_path: Path) -> None:
    arr = np.zeros((50, 50), np.uint8)
    arr[10:20, 10:40] = 255
    arr[30, 30] = 1  # any value > 0 is defect
    path = tmp_path / "m_mask.png"
    Image.fromarray(arr).save(path)
    mask = load_mask(path, 100)
    assert mask.dtype == bool and set(np.unique(mask)) == {False, True}
    assert mask[61, 61]
    with pytest.raises(DatasetError, match=r"Ground-truth mask not found: .*nope_mask\.png"):
        load_mask(tmp_path / "nope_mask.png", 64)


# --------------------------------------------------------------------------- folders


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    png = _png_bytes(Image.new("RGB", (20, 20)))
    for name in ("b.PNG", "a.JpG", "c.webp", ".hidden.png", "._a.png", "notes.txt", "z.gif"):
        (tmp_path / name).write_bytes(png)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.bmp").write_bytes(png)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "e.png").write_bytes(png)
    assert [p.name for p in list_images(tmp_path)] == ["a.JpG", "b.PNG", "c.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == [
        "a.JpG",
        "b.PNG",
        "c.webp",
        "d.bmp",
    ]
    assert ".tif" in IMAGE_EXTENSIONS
    with pytest.raises(DatasetError, match="Folder not found"):
        list_images(tmp_path / "missing")


@needs_data
def test_load_images_collects_failures_without_crashing(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello", encoding="utf-8")
    good = BOTTLE / "train" / "good" / "000.png"
    report = load_images(
        [good, tmp_path / "empty.png", ("upload.png", good.read_bytes()), tmp_path / "text.jpg"],
        image_size=32,
    )
    assert [name for name, _ in report.images] == ["000.png", "upload.png"]
    assert all(arr.shape == (3, 32, 32) for _, arr in report.images)
    assert report.failures == [
        ("empty.png", "the file is empty (0 bytes). Re-export or re-copy it."),
        (
            "text.jpg",
            "not a readable image. The file content is not PNG, JPEG, BMP, TIFF or WEBP "
            "(it may be another kind of file renamed, or damaged).",
        ),
    ]


def test_check_enough_images() -> None:
    check_enough_images(MIN_TRAIN_IMAGES)
    with pytest.raises(DatasetError, match=r"^Need at least 10 good images to train; got 3\. "):
        check_enough_images(3)


# --------------------------------------------------------------------------- MVTec layout


@needs_data
def test_real_mvtec_layouts() -> None:
    bottle = load_mvtec_layout(BOTTLE)
    assert len(bottle.train_good) == 209
    assert sum(t.label == 0 for t in bottle.test_items) == 20
    assert sum(t.label == 1 for t in bottle.test_items) == 63
    assert bottle.defect_types == ["broken_large", "broken_small", "contamination"]
    assert all(t.mask_path is not None and t.mask_path.is_file() for t in bottle.test_items if t.label)
    assert all(t.mask_path is None for t in bottle.test_items if t.label == 0)

    tile = load_mvtec_layout(TILE)
    assert len(tile.train_good) == 762
    assert sum(t.label == 0 for t in tile.test_items) == 190
    assert sum(t.label == 1 for t in tile.test_items) == 392
    assert is_mvtec_layout(TILE) and not is_mvtec_layout(TILE / "train")


@needs_data
def test_resolve_training_images() -> None:
    assert len(resolve_training_images(BOTTLE)) == 209
    assert len(resolve_training_images(BOTTLE / "test" / "good")) == 20


def _make_mvtec(root: Path, with_mask: bool = True) -> None:
    png = _png_bytes(Image.new("RGB", (20, 20)))
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    (root / "test" / "scratch").mkdir(parents=True)
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    for i in range(3):
        (root / "train" / "good" / f"{i:03d}.png").write_bytes(png)
    (root / "test" / "good" / "000.png").write_bytes(png)
    (root / "test" / "scratch" / "000.png").write_bytes(png)
    (root / "test" / "scratch" / "001.png").write_bytes(png)
    (root / "ground_truth" / "scratch" / "000_mask.png").write_bytes(png)
    if with_mask:
        (root / "ground_truth" / "scratch" / "001_mask.png").write_bytes(png)


def test_synthetic_mvtec_and_missing_mask(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    _make_mvtec(ok)
    ds = load_mvtec_layout(ok)
    assert [(t.defect_type, t.label) for t in ds.test_items] == [
        ("good", 0),
        ("scratch", 1),
        ("scratch", 1),
    ]
    bad = tmp_path / "bad"
    _make_mvtec(bad, with_mask=False)
    with pytest.raises(
        DatasetError,
        match=r"^bad: 1 defective test image\(s\) have no ground-truth mask: test/scratch/001\.png",
    ):
        load_mvtec_layout(bad)


def test_mvtec_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no train/good folder"):
        load_mvtec_layout(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train/good contains no images"):
        load_mvtec_layout(tmp_path)
    with pytest.raises(DatasetError, match=r"train/good: no images found"):
        resolve_training_images(tmp_path)


# --------------------------------------------------------------------------- fingerprint


def test_dataset_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    fp = dataset_fingerprint([a, b])
    assert len(fp) == 64
    assert dataset_fingerprint([b, a]) == fp
    assert dataset_fingerprint([("a.png", b"one"), ("b.png", b"two")]) == fp
    b.write_bytes(b"three")
    assert dataset_fingerprint([a, b]) != fp
    assert dataset_fingerprint([("a.png", b"one"), ("c.png", b"two")]) != fp


def test_names_for_disambiguates_clashes() -> None:
    paths = [Path("t/good/000.png"), Path("t/crack/000.png"), Path("t/crack/001.png")]
    assert names_for(paths) == ["good/000.png", "crack/000.png", "001.png"]
