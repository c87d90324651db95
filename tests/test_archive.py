"""Tests for fod_app.archive: hostile zip uploads."""

from __future__ import annotations

import gc
import io
import stat
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from fod_app.archive import (
    ArchiveError,
    UnpackFolder,
    _copy_capped,
    extract_images_from_zip,
    find_mvtec_root,
)
from fod_app.data import load_mvtec_layout

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = DATASETS / "mvtec_bottle"


def _png(colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_flat_extraction_dedupes_and_sanitises(tmp_path: Path) -> None:
    data = _zip(
        [
            ("good/001.png", _png()),
            ("bad/001.png", _png((1, 1, 1))),
            ("A.png", _png()),
            ("a.PNG", _png()),
            ("CON.png", _png()),
            ("dir\\win name?.png", _png()),
            ("Prüfteil_日本.jpg", _png()),
        ]
    )
    report = extract_images_from_zip(data, tmp_path / "out")
    names = sorted(p.name for p in report.extracted)
    assert names == sorted(
        ["001.png", "001_2.png", "A.png", "a_2.PNG", "_CON.png", "win name_.png", "Prüfteil_日本.jpg"]
    )
    assert report.skipped == []
    assert all(p.parent == (tmp_path / "out").resolve() for p in report.extracted)


def test_path_traversal_and_absolute_paths_never_escape(tmp_path: Path) -> None:
    dest = tmp_path / "inner" / "out"
    data = _zip(
        [
            ("../evil.png", _png()),
            ("a/../../evil2.png", _png()),
            ("/tmp/evil3.png", _png()),
            ("C:/evil4.png", _png()),
            ("C:\\evil5.png", _png()),
            ("..\\evil6.png", _png()),
            ("ok.png", _png()),
        ]
    )
    for keep in (False, True):
        report = extract_images_from_zip(data, dest, keep_structure=keep)
        assert [p.name for p in report.extracted] == ["ok.png"]
        reasons = dict(report.skipped)
        assert "'..'" in reasons["../evil.png"] and "outside the upload folder" in reasons["../evil.png"]
        assert "'..'" in reasons["a/../../evil2.png"]
        assert "..\\evil6.png" in reasons
        assert reasons["/tmp/evil3.png"].startswith("unsafe absolute path")
        assert reasons["C:/evil4.png"].startswith("unsafe absolute path")
        assert reasons["C:\\evil5.png"].startswith("unsafe absolute path")
        for p in report.extracted:
            p.unlink()
    assert _all_files(tmp_path) == []


def test_symlink_entry_is_skipped(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    report = extract_images_from_zip(_zip([(link, b"/etc/passwd"), ("real.png", _png())]), tmp_path)
    assert [p.name for p in report.extracted] == ["real.png"]
    assert report.skipped == [("link.png", "symbolic link; skipped (links are never followed)")]
    assert not (tmp_path / "link.png").exists()


def _set_encrypted_flag(data: bytes, name: bytes) -> bytes:
    """Set the 'encrypted' general-purpose flag bit of entry ``name`` in both headers."""
    raw = bytearray(data)
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        name_offset = 30 if signature == b"PK\x03\x04" else 46
        pos = raw.find(signature)
        while raw[pos + name_offset : pos + name_offset + len(name)] != name:
            pos = raw.find(signature, pos + 1)
        raw[pos + flag_offset] |= 0x1
    return bytes(raw)


def test_encrypted_entry_is_refused_with_message(tmp_path: Path) -> None:
    data = _set_encrypted_flag(_zip([("secret.png", _png()), ("open.png", _png())]), b"secret.png")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.getinfo("secret.png").flag_bits & 0x1
    report = extract_images_from_zip(data, tmp_path)
    assert [p.name for p in report.extracted] == ["open.png"]
    assert report.skipped[0][0] == "secret.png"
    assert report.skipped[0][1].startswith("password-protected (encrypted); skipped")
    with pytest.raises(ArchiveError, match=r"contains no images.*password-protected"):
        extract_images_from_zip(_set_encrypted_flag(_zip([("secret.png", _png())]), b"secret.png"), tmp_path / "only")


def test_zip_bomb_ratio_refused(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    bomb = _zip([("first.png", _png()), ("bomb.png", b"\0" * (8 * 1024**2))])
    with pytest.raises(ArchiveError, match=r"possible 'zip bomb': bomb\.png would expand .* 8\.0 MB"):
        extract_images_from_zip(bomb, dest, name="upload.zip")
    assert _all_files(dest) == []


def test_total_size_limit(tmp_path: Path) -> None:
    data = _zip([("a.png", _png()), ("b.png", _png((9, 9, 9)))])
    with pytest.raises(ArchiveError, match=r"would take more than 100 bytes once unzipped"):
        extract_images_from_zip(data, tmp_path, max_total_bytes=100)


def test_actual_bytes_never_exceed_declared_size(tmp_path: Path) -> None:
    # A stored entry whose headers claim 10 bytes but which carries 100 bytes of data.
    payload = b"A" * 100
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("liar.png", payload)
    raw = bytearray(buf.getvalue())
    crc_real = zlib.crc32(payload).to_bytes(4, "little")
    crc_fake = zlib.crc32(payload[:10]).to_bytes(4, "little")
    size_real = (100).to_bytes(4, "little")
    # local header (offset 14) and central header (offset 16): crc, compressed, uncompressed
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    for start in (local + 14, central + 16):
        assert raw[start : start + 12] == crc_real + size_real + size_real
        raw[start : start + 12] = crc_fake + size_real + (10).to_bytes(4, "little")
    report = extract_images_from_zip(bytes(raw), tmp_path)
    assert [p.stat().st_size for p in report.extracted] == [10]


def test_copy_capped_stops_and_removes_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    assert _copy_capped(io.BytesIO(b"x" * 100), target, 10) > 10
    assert not target.exists()
    assert _copy_capped(io.BytesIO(b"x" * 100), target, 100) == 100
    assert target.stat().st_size == 100


def test_too_many_files(tmp_path: Path) -> None:
    data = _zip([(f"{i}.png", _png()) for i in range(4)])
    with pytest.raises(ArchiveError, match=r"contains 4 files; the limit is 3\. Split"):
        extract_images_from_zip(data, tmp_path, max_files=3)


def test_nested_zip_and_non_images_skipped_with_notes(tmp_path: Path) -> None:
    inner = _zip([("inner.png", _png())])
    data = _zip(
        [
            ("inner.zip", inner),
            ("readme.txt", b"hello"),
            ("Makefile", b"all:"),
            ("img.png", _png()),
            ("__MACOSX/._img.png", b"junk"),
            (".DS_Store", b"junk"),
        ]
    )
    report = extract_images_from_zip(data, tmp_path)
    assert [p.name for p in report.extracted] == ["img.png"]
    assert report.skipped == [
        ("inner.zip", "a zip inside the zip is not opened; unzip it and upload its images directly"),
        ("readme.txt", "not an image file (.txt); skipped"),
        ("Makefile", "not an image file (no extension); skipped"),
    ]


def test_zip_without_images(tmp_path: Path) -> None:
    data = _zip([("readme.txt", b"hello"), ("data.csv", b"1,2")])
    with pytest.raises(
        ArchiveError,
        match=r"^parts\.zip: the zip contains no images \(\.png.*readme\.txt: not an image file",
    ):
        extract_images_from_zip(data, tmp_path, name="parts.zip")


def test_not_a_zip_empty_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=r"^photos\.zip: not a valid zip file"):
        extract_images_from_zip(b"this is not a zip at all", tmp_path, name="photos.zip")
    with pytest.raises(ArchiveError, match=r"^uploaded zip: the file is empty \(0 bytes\)"):
        extract_images_from_zip(b"", tmp_path)
    data = _zip([("a.png", _png())])
    path = tmp_path / "cut.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"^cut\.zip: not a valid zip file"):
        extract_images_from_zip(path, tmp_path / "out")


def test_corrupt_entry_is_skipped(tmp_path: Path) -> None:
    data = bytearray(_zip([("a.png", _png()), ("b.png", _png((200, 0, 0)))]))
    start = data.find(b"PK\x03\x04") + 30 + len("a.png")
    data[start : start + 20] = bytes(20)  # damage a.png's compressed data
    report = extract_images_from_zip(bytes(data), tmp_path)
    assert [p.name for p in report.extracted] == ["b.png"]
    assert report.skipped[0][0] == "a.png"
    assert report.skipped[0][1].startswith("damaged inside the zip")


def test_non_utf8_entry_name(tmp_path: Path) -> None:
    raw = bytearray(_zip([("AAAA.png", _png())]))
    assert raw.count(b"AAAA.png") == 2  # local + central header, no UTF-8 flag (ASCII name)
    raw = raw.replace(b"AAAA.png", b"\x81\xe9\xff\xfe.png")
    report = extract_images_from_zip(bytes(raw), tmp_path)
    assert len(report.extracted) == 1
    name = report.extracted[0].name
    assert name.endswith(".png")
    name.encode("utf-8")


def test_existing_files_and_links_in_dest_are_not_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.png").write_bytes(b"keep me")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"outside")
    (dest / "b.png").symlink_to(outside)
    report = extract_images_from_zip(_zip([("a.png", _png()), ("b.png", _png())]), dest)
    assert sorted(p.name for p in report.extracted) == ["a_2.png", "b_2.png"]
    assert (dest / "a.png").read_bytes() == b"keep me"
    assert outside.read_bytes() == b"outside"


def test_file_path_and_file_object_sources(tmp_path: Path) -> None:
    data = _zip([("a.png", _png())])
    path = tmp_path / "in.zip"
    path.write_bytes(data)
    assert len(extract_images_from_zip(path, tmp_path / "o1").extracted) == 1
    stream = io.BytesIO(data)
    assert len(extract_images_from_zip(stream, tmp_path / "o2").extracted) == 1


def test_mvtec_structure_preserved(tmp_path: Path) -> None:
    good = BOTTLE / "train" / "good"
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [
        (f"bottle/train/good/{p.name}", p.read_bytes()) for p in sorted(good.glob("*.png"))[:3]
    ]
    entries += [
        ("bottle/test/good/000.png", (BOTTLE / "test" / "good" / "000.png").read_bytes()),
        (
            "bottle/test/broken_large/000.png",
            (BOTTLE / "test" / "broken_large" / "000.png").read_bytes(),
        ),
        (
            "bottle/ground_truth/broken_large/000_mask.png",
            (BOTTLE / "ground_truth" / "broken_large" / "000_mask.png").read_bytes(),
        ),
        ("bottle/../../escape.png", _png()),
        ("bottle/license.txt", b"CC BY-NC-SA"),
    ]
    dest = tmp_path / "upload"
    report = extract_images_from_zip(_zip(entries), dest, keep_structure=True)
    assert len(report.extracted) == 6
    assert {name for name, _ in report.skipped} == {"bottle/../../escape.png", "bottle/license.txt"}
    root = find_mvtec_root(dest)
    assert root == (dest / "bottle")
    ds = load_mvtec_layout(root)
    assert len(ds.train_good) == 3
    assert [(t.defect_type, t.label, t.mask_path is not None) for t in ds.test_items] == [
        ("broken_large", 1, True),
        ("good", 0, False),
    ]
    assert not (tmp_path / "escape.png").exists()
    assert find_mvtec_root(tmp_path / "upload" / "bottle" / "test") is None


def test_an_unpacked_upload_is_removed_with_its_session_state() -> None:
    """The Evaluate page keeps an uploaded zip's images in an ``UnpackFolder`` in the session's state: replacing it
    removes it at once, and a closed session's state (dropped by Streamlit, then garbage-collected) takes it along —
    before, every such session left its images in the temporary folder."""
    first = UnpackFolder(prefix="fod-test-")
    report = extract_images_from_zip(_zip([("good/a.png", _png()), ("defect/b.png", _png())]), first.path,
                                     keep_structure=True)
    assert len(report.extracted) == 2 and (first.path / "good" / "a.png").is_file()
    first.remove()
    assert not first.path.exists()
    first.remove()  # at most once: no error
    state = {"folder": UnpackFolder(prefix="fod-test-")}
    kept = state["folder"].path
    (kept / "x.png").write_bytes(_png())
    del state
    gc.collect()
    assert not kept.exists()
