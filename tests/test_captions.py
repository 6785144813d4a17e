"""Image-caption sets: WebDataset shards, loose folders, saved datasets, the built-in set."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from weightport.captions import BUILTIN_CAPTIONS, CaptionSample, _expand_ranges, decode_image, load_captions
from weightport.errors import WeightportError

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 30, 30), (30, 160, 40), (30, 60, 200), (230, 200, 20), (120, 40, 160), (0, 0, 0), (250, 250, 250)]


def encode(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (12, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (no webdataset encoding on the way)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def error(source, **kw) -> str:
    with pytest.raises(WeightportError) as caught:
        load_captions(source, **kw)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def records() -> list[dict]:
    """Seven WebDataset samples: jpg and png images, non-ASCII captions, nested json."""
    result = []
    for i, colour in enumerate(COLOURS):
        ext = "png" if i % 2 else "jpg"
        result.append({"__key__": f"sample{i:04d}", ext: encode(colour, "PNG" if ext == "png" else "JPEG"),
                       "txt": f"  caption n°{i}: a {ext} swatch\n",
                       "json": {"id": i, "colour": list(colour), "tags": ["swatch", ext]}})
    return result


def assert_matches(samples: list[CaptionSample], records: list[dict]) -> None:
    assert [s.key for s in samples] == [r["__key__"] for r in records]
    for sample, record in zip(samples, records):
        ext = "png" if "png" in record else "jpg"
        assert sample.caption == record["txt"].strip()
        assert (sample.image_ext, sample.image) == (ext, record[ext])
        assert sample.meta == record["json"]


@pytest.fixture
def shards(tmp_path, records) -> Path:
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=3, verbose=0) as sink:
        for record in records:
            sink.write(record)
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]
    return folder


def test_webdataset_tar_round_trip(tmp_path, records):
    import webdataset as wds

    path = tmp_path / "one.tar"
    with wds.TarWriter(str(path)) as sink:
        for record in records:
            sink.write(record)
    assert_matches(load_captions(path), records)
    assert_matches(load_captions(str(path)), records)


def test_shard_directory_brace_pattern_and_glob_agree(shards, records):
    by_dir = load_captions(shards)
    assert_matches(by_dir, records)
    assert load_captions(f"{shards}/shard-{{000000..000002}}.tar") == by_dir
    assert load_captions(f"{shards}/shard-*.tar") == by_dir


def test_brace_pattern_without_braceexpand(shards, records, monkeypatch):
    monkeypatch.setitem(sys.modules, "braceexpand", None)  # makes `import braceexpand` fail
    assert_matches(load_captions(f"{shards}/shard-{{000000..000002}}.tar"), records)
    assert _expand_ranges("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert _expand_ranges("s-{09..10}-{1..0}") == ["s-09-1", "s-09-0", "s-10-1", "s-10-0"]
    assert error(f"{shards}/shard-{{a,b}}.tar") == (
        f"{shards}/shard-{{a,b}}.tar: without the braceexpand package only {{a..b}} number ranges "
        "can be expanded (pip install braceexpand)")


def test_limit_crosses_shards_and_stops_reading(shards, records):
    # the last shard is garbage: reaching it would fail, so passing shows it is never opened
    (shards / "shard-000002.tar").write_bytes(b"not a tar")
    assert_matches(load_captions(shards, limit=4), records[:4])
    assert_matches(load_captions(f"{shards}/shard-{{000000..000002}}.tar", limit=3), records[:3])
    assert error(shards) == f"{shards / 'shard-000002.tar'}: not a tar file (no tar header at the start)"
    assert error(shards, limit=0) == "caption limit must be at least 1, got 0"


def test_tar_names_and_junk(tmp_path):
    # `tar -C dir .` prefixes ./, macOS adds ._ and __MACOSX entries, keys may have folders
    jpg = encode(COLOURS[0], "JPEG")
    path = write_tar(tmp_path / "odd.tar", [
        (".DS_Store", b"\0\1junk"), ("./0001.jpg", jpg), ("./0001.txt", b"first"),
        ("__MACOSX/._0001.jpg", b"\xff\xfe"), ("./0001.cls", b"7"),
        ("part/0002.json", b'{"text": "from json text"}'), ("part/0002.seg.png", b"not read"),
        ("0003.JPEG", jpg), ("0003.json", b'{"caption": "json wins", "text": "no"}'), ("0003.txt", b" \n"),
    ])
    samples = load_captions(path)
    assert [(s.key, s.caption, s.image_ext) for s in samples] == [
        ("0001", "first", "jpg"), ("part/0002", "from json text", None), ("0003", "json wins", "jpeg")]
    assert samples[0].image == jpg and samples[0].meta == {}
    assert samples[1].image is None and samples[1].meta == {"text": "from json text"}


def test_loose_folder(tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    png, jpg = encode(COLOURS[1], "PNG", (5, 9)), encode(COLOURS[2], "JPEG")
    (folder / "0002.png").write_bytes(png)
    (folder / "0002.txt").write_text("second, written first\n", encoding="utf-8")
    (folder / "0001.jpg").write_bytes(jpg)
    (folder / "0001.txt").write_text("first", encoding="utf-8")
    (folder / "0001.json").write_text('{"caption": "ignored, txt wins", "n": 1}', encoding="utf-8")
    (folder / "0003.json").write_text('{"caption": "only json"}', encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "subdir").mkdir()
    samples = load_captions(folder)
    assert samples == [
        CaptionSample("0001", "first", jpg, "jpg", {"caption": "ignored, txt wins", "n": 1}),
        CaptionSample("0002", "second, written first", png, "png", {}),
        CaptionSample("0003", "only json", None, None, {"caption": "only json"}),
    ]
    assert decode_image(samples[1]).size == (5, 9)
    assert load_captions(folder, limit=2) == samples[:2]


def test_saved_dataset(tmp_path):
    import datasets

    sizes = [(16, 8), (7, 11), (9, 9)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "other": datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", s, c) for s, c in zip(sizes, COLOURS)],
         "caption": ["a red one", " a green one ", "a blue one"], "other": [1, 2, 3]}, features=features)
    dataset.save_to_disk(str(tmp_path / "ds"))
    samples = load_captions(tmp_path / "ds")
    assert [(s.key, s.caption, s.image_ext, s.meta) for s in samples] == [
        ("0", "a red one", "png", {}), ("1", "a green one", "png", {}), ("2", "a blue one", "png", {})]
    for sample, size, colour in zip(samples, sizes, COLOURS):
        image = decode_image(sample)
        assert (image.mode, image.size) == ("RGB", size)
        assert image.getpixel((0, 0)) == colour  # PNG is lossless
    assert load_captions(tmp_path / "ds", limit=2) == samples[:2]


def test_saved_dataset_byte_columns_and_splits(tmp_path):
    import datasets

    jpgs = [encode(c, "JPEG") for c in COLOURS[:2]]
    split = datasets.Dataset.from_dict({"jpg": jpgs, "text": ["one", "two"]})
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "one"))
    samples = load_captions(tmp_path / "one")
    assert [(s.caption, s.image, s.image_ext) for s in samples] == [("one", jpgs[0], "jpg"), ("two", jpgs[1], "jpg")]

    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "two"))
    assert error(tmp_path / "two") == (f"{tmp_path / 'two'}: holds the splits train, test; pass one split's "
                                       f"folder, e.g. {tmp_path / 'two' / 'train'}")
    datasets.Dataset.from_dict({"label": [1]}).save_to_disk(str(tmp_path / "nocap"))
    assert error(tmp_path / "nocap") == (f"{tmp_path / 'nocap'}: no caption column (looked for caption, txt, "
                                         "text, image_description, description; the columns are label)")


def test_saved_dataset_without_datasets_package(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert error(tmp_path) == (f"{tmp_path}: reading a saved datasets folder needs the datasets package "
                               "(pip install datasets)")


def test_builtin_set():
    samples = load_captions()
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(100)]
    for sample in samples:
        assert sample.caption and sample.caption == sample.meta["caption"]
        assert sample.meta["source"] == "weightport built-in caption set"
        assert sample.caption.endswith(f"on a {sample.meta['background']} background")
        assert 1 <= len(sample.meta["shapes"]) <= 3
        image = decode_image(sample)
        assert (sample.image_ext, image.mode, image.size) == ("jpg", "RGB", (64, 64))
    assert len({s.caption for s in samples}) > 90
    assert load_captions(None, limit=5) == samples[:5]
    assert BUILTIN_CAPTIONS.stat().st_size < 400_000


def test_builtin_set_reads_with_webdataset():
    import webdataset as wds

    theirs = list(wds.WebDataset(str(BUILTIN_CAPTIONS), shardshuffle=False))
    ours = load_captions()
    assert [(r["__key__"], r["txt"].decode(), r["jpg"]) for r in theirs] == [(s.key, s.caption, s.image) for s in ours]


def test_builtin_set_is_reproducible(tmp_path):
    out = tmp_path / "again.tar"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_caption_set.py"), str(out)],
                   check=True, capture_output=True)
    again, shipped = load_captions(out), load_captions()
    assert [(s.key, s.caption, s.meta) for s in again] == [(s.key, s.caption, s.meta) for s in shipped]
    # another Pillow/libjpeg may encode other JPEG bytes for the same drawing; the pixels must agree
    import numpy as np

    for x, y in zip(again, shipped):
        diff = np.abs(np.asarray(decode_image(x), dtype=float) - np.asarray(decode_image(y), dtype=float))
        assert diff.mean() < 1.0, f"sample {x.key}: rerun scripts/make_caption_set.py"
    twice = tmp_path / "twice.tar"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_caption_set.py"), str(twice)],
                   check=True, capture_output=True)
    assert twice.read_bytes() == out.read_bytes()


JPG = encode(COLOURS[0], "JPEG")


@pytest.mark.parametrize("members, expected", [
    ([("0003.jpg", JPG), ("0003.txt", b"caf\xe9")], "member 0003.txt is not UTF-8"),
    ([("0003.txt", b"ok"), ("0003.json", b'{"a": 1 "b": 2}')],
     "member 0003.json is not valid JSON (Expecting ',' delimiter: line 1 column 9 (char 8))"),
    ([("0003.json", b"[1, 2]")], "member 0003.json is not a JSON object (it is a list)"),
    ([("0003.json", b'{"caption": ["a", "b"]}')], 'member 0003.json has a "caption" that is a list, not a string'),
    ([("0001.txt", b"fine"), ("0003.jpg", JPG)],
     'sample 0003 has no caption (no .txt member and no "caption" in its .json)'),
    ([("0003.jpg", JPG), ("0003.json", b'{"label": 1}')],
     'sample 0003 has no caption (no .txt member and no "caption" in its .json)'),
    ([("0003.txt", b"  "), ("0003.jpg", JPG)],
     'sample 0003 has an empty caption (0003.txt is blank and there is no "caption" in its .json)'),
    ([("0003.txt", b"a"), ("0004.txt", b"b"), ("0003.jpg", JPG)],
     "sample 0003 is split: member 0003.jpg is not next to the sample's other members"),
    ([("0003.txt", b"a"), ("0003.TXT", b"b")], "sample 0003 has two .txt members (0003.txt and 0003.TXT)"),
    ([(".DS_Store", b"x"), ("__MACOSX/._0001.txt", b"\xff")], "no caption samples found"),
])
def test_bad_tar_members(tmp_path, members, expected):
    path = write_tar(tmp_path / "bad.tar", members)
    assert error(path) == f"{path}: {expected}"


def test_bad_loose_file(tmp_path):
    (tmp_path / "0003.txt").write_bytes(b"\xff\xfe")
    assert error(tmp_path) == f"{tmp_path}: member 0003.txt is not UTF-8"


def test_not_a_tar(tmp_path):
    path = tmp_path / "notes.tar"
    path.write_text("just some notes, not a tar file\n")
    assert error(path) == f"{path}: not a tar file (no tar header at the start)"
    path.write_bytes(b"")
    assert error(path) == f"{path}: not a tar file (the file is empty)"


def test_truncated_tar(tmp_path):
    data = BUILTIN_CAPTIONS.read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:1000])  # inside the first image
    assert error(path) == f"{path}: truncated or corrupt tar file (unexpected end of data)"

    # cut exactly after the last member, where tarfile itself would just stop reading
    with tarfile.open(BUILTIN_CAPTIONS) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(data[:last.offset_data + -(-last.size // 512) * 512])
    assert error(path) == f"{path}: truncated or corrupt tar file (no end-of-archive marker after 000099.txt)"
    # samples before the cut are still readable with a limit
    assert load_captions(path, limit=99) == load_captions(limit=99)


def test_missing_and_empty(tmp_path):
    assert error(tmp_path / "nope.tar") == f"{tmp_path / 'nope.tar'}: no such file or directory"
    assert error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or directory"
    assert error(f"{tmp_path}/s-{{0..1}}.tar") == f"{tmp_path}/s-0.tar: no such file or directory"
    assert error(f"{tmp_path}/*.tar") == f"{tmp_path}/*.tar: no files match"
    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty") == f"{tmp_path / 'empty'}: no caption samples found"


def test_decode_image_errors():
    with pytest.raises(WeightportError, match=r"^caption sample k has no image$"):
        decode_image(CaptionSample("k", "c", None, None, {}))
    with pytest.raises(WeightportError, match=r"^caption sample k: its png image cannot be decoded \("):
        decode_image(CaptionSample("k", "c", b"\x89PNG\r\n\x1a\n broken", "png", {}))
