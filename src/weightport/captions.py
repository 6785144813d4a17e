"""Image-caption sets for checking a converted vision-language model.

A set is read from WebDataset tar shards, a folder of loose WebDataset-style files, or a
folder written by `datasets.Dataset.save_to_disk`; with no source, the small built-in set
shipped with the package is used. Images stay encoded as stored: decoding them needs
Pillow, which is optional, so only `decode_image` asks for it.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WeightportError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["BUILTIN_CAPTIONS", "CaptionSample", "decode_image", "load_captions"]

BUILTIN_CAPTIONS = Path(__file__).resolve().parent / "data" / "captions-builtin.tar"

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Only these members are read; anything else in a sample (class labels, masks, arrays)
# is skipped without loading its data.
WANTED_EXTS = frozenset(IMAGE_EXTS + ("txt", "json"))
JSON_CAPTION_FIELDS = ("caption", "text")
CAPTION_COLUMNS = ("caption", "txt", "text", "image_description", "description")
IMAGE_COLUMNS = ("image", "jpg", "png", "img")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PATTERN_CHARS = frozenset("{}*?[")

# key -> extension -> (member or file name, data)
Members = dict[str, tuple[str, bytes]]


@dataclass(frozen=True)
class CaptionSample:
    key: str  # WebDataset __key__ / file stem / dataset row index
    caption: str
    image: bytes | None  # the encoded image bytes as stored (jpg/png/...), not decoded
    image_ext: str | None  # "jpg", "png", ...
    meta: dict  # the parsed json member, if any, else {}


def load_captions(source: str | Path | None = None, limit: int | None = None) -> list[CaptionSample]:
    """Read a caption set, in a fixed order; with `limit`, only the first `limit` samples.

    `source`: None for the built-in set; a tar shard; a directory of shards, of loose
    files, or written by `datasets.save_to_disk`; or a brace pattern or glob of shards.
    """
    if limit is not None and limit < 1:
        raise WeightportError(f"caption limit must be at least 1, got {limit}")
    where = BUILTIN_CAPTIONS if source is None else source
    # closing the generator closes whichever file it stopped in when the limit is reached
    with closing(_samples(where)) as samples:
        result = list(islice(samples, limit))
    if not result:
        raise WeightportError(f"{where}: no caption samples found")
    return result


def decode_image(sample: CaptionSample) -> PILImage:
    """The sample's image as an RGB Pillow image."""
    try:
        from PIL import Image
    except ImportError:
        raise WeightportError("decoding caption images needs Pillow (pip install pillow)") from None
    if sample.image is None:
        raise WeightportError(f"caption sample {sample.key} has no image")
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            return image.convert("RGB")
    # Pillow reports damaged data as any of these, depending on the format and the damage
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise WeightportError(f"caption sample {sample.key}: its {sample.image_ext or 'image'} "
                              f"image cannot be decoded ({_one_line(e)})") from None


# --- choosing a reader -----------------------------------------------------------------


def _samples(source: str | Path) -> Iterator[CaptionSample]:
    path = Path(source)
    if path.is_dir():
        yield from _directory_samples(path)
    elif path.exists():
        yield from _shard_samples([path])
    elif PATTERN_CHARS & set(str(source)):
        yield from _shard_samples(_expand_pattern(str(source)))
    else:
        raise WeightportError(f"{path}: no such file or directory")


def _directory_samples(path: Path) -> Iterator[CaptionSample]:
    if any((path / marker).is_file() for marker in DATASET_MARKERS):
        yield from _dataset_samples(path)
        return
    shards = sorted(p for p in path.iterdir()
                    if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES) and not _is_junk(p.name))
    if shards:
        yield from _shard_samples(shards)
    else:
        yield from _group_samples(path, _folder_groups(path))


def _expand_pattern(pattern: str) -> list[Path]:
    try:
        from braceexpand import braceexpand
    except ImportError:
        names = _expand_ranges(pattern)
    else:
        try:
            names = list(braceexpand(pattern))
        except ValueError as e:  # unbalanced braces
            raise WeightportError(f"{pattern}: bad brace pattern ({_one_line(e)})") from None
    paths: list[Path] = []
    for name in names:
        # a brace-expanded name is a shard that must exist; a glob may match nothing
        paths += sorted(map(Path, glob.glob(name))) if glob.has_magic(name) else [Path(name)]
    if not paths:
        raise WeightportError(f"{pattern}: no files match")
    return paths


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_ranges(pattern: str) -> list[str]:
    """Expand `{a..b}` number ranges (zero-padded when a bound is), as braceexpand would."""
    if set("{}") & set(_RANGE.sub("", pattern)):
        raise WeightportError(f"{pattern}: without the braceexpand package only {{a..b}} number "
                              "ranges can be expanded (pip install braceexpand)")
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.groups()
    padded = any(len(b) > 1 and b.startswith("0") for b in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if int(last) >= int(first) else -1
    head, tails = pattern[:match.start()], _expand_ranges(pattern[match.end():])
    return [f"{head}{n:0{width}d}{tail}" for n in range(int(first), int(last) + step, step) for tail in tails]


# --- WebDataset samples ----------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key runs to the first dot of the base name."""
    if name.startswith("./"):  # `tar -C dir .` writes names like ./0001.jpg
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _is_junk(name: str) -> bool:
    # dot files (macOS ._ resource forks, .DS_Store) and __dunder__ entries are never samples
    name = name[2:] if name.startswith("./") else name
    return any(part.startswith((".", "__")) for part in name.split("/"))


def _shard_samples(paths: Iterable[Path]) -> Iterator[CaptionSample]:
    for path in paths:
        yield from _group_samples(path, _tar_groups(path))


def _group_samples(where: Path, groups: Iterator[tuple[str, Members]]) -> Iterator[CaptionSample]:
    for key, members in groups:
        yield _make_sample(where, key, members)


def _tar_groups(path: Path) -> Iterator[tuple[str, Members]]:
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise WeightportError(f"{path}: no such file or directory") from None
    except IsADirectoryError:
        raise WeightportError(f"{path}: is a directory, not a tar file") from None
    except OSError as e:
        raise WeightportError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None
    with file:
        try:
            tar = tarfile.open(fileobj=file, mode="r:*")
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            # tarfile's own message lists every compression it tried, over several lines
            reason = "the file is empty" if path.stat().st_size == 0 else "no tar header at the start"
            raise WeightportError(f"{path}: not a tar file ({reason})") from None
        try:
            yield from _group_members(path, tar)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise WeightportError(f"{path}: truncated or corrupt tar file ({_one_line(e)})") from None


def _group_members(path: Path, tar: tarfile.TarFile) -> Iterator[tuple[str, Members]]:
    # A WebDataset sample is a run of consecutive members sharing a key; reading it as a
    # stream is what lets a limit stop without reading the rest of the shard.
    key: str | None = None
    members: Members = {}
    finished: set[str] = set()
    last_name = "the start"
    for info in tar:
        last_name = info.name
        if not info.isreg():
            continue
        if _is_junk(info.name):
            continue
        member_key, ext = _split_name(info.name)
        if member_key != key:
            if key is not None:
                yield key, members
                finished.add(key)
            if member_key in finished:
                raise WeightportError(f"{path}: sample {member_key} is split: member {info.name} "
                                      "is not next to the sample's other members")
            key, members = member_key, {}
        if ext in WANTED_EXTS:
            if ext in members:
                raise WeightportError(f"{path}: sample {key} has two .{ext} members "
                                      f"({members[ext][0]} and {info.name})")
            members[ext] = (info.name, tar.extractfile(info).read())
    _check_end_marker(path, tar, last_name)
    if key is not None:  # held back until the end check, as a cut may have ended it early
        yield key, members


def _check_end_marker(path: Path, tar: tarfile.TarFile, last_name: str) -> None:
    # tarfile stops quietly at a cut-off or garbage header; a well-formed tar ends with a
    # zero block, so anything else means the file lost its tail.
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise WeightportError(f"{path}: truncated or corrupt tar file "
                              f"(no end-of-archive marker after {last_name})")


def _folder_groups(folder: Path) -> Iterator[tuple[str, Members]]:
    files: dict[str, dict[str, Path]] = {}
    for entry in sorted(folder.iterdir()):
        if _is_junk(entry.name) or not entry.is_file():
            continue
        key, ext = _split_name(entry.name)
        group = files.setdefault(key, {})
        if ext in group:  # e.g. 0001.JPG next to 0001.jpg
            raise WeightportError(f"{folder}: sample {key} has two .{ext} files "
                                  f"({group[ext].name} and {entry.name})")
        group[ext] = entry
    for key in sorted(files):
        yield key, {ext: (file.name, _read_file(folder, file))
                    for ext, file in files[key].items() if ext in WANTED_EXTS}


def _read_file(folder: Path, file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise WeightportError(f"{folder}: cannot read {file.name} ({e.strerror or _one_line(e)})") from None


def _make_sample(where: Path, key: str, members: Members) -> CaptionSample:
    meta = _parse_json(where, *members["json"]) if "json" in members else {}
    caption = ""
    if "txt" in members:
        caption = _utf8(where, *members["txt"]).strip()
    if not caption and "json" in members:
        caption = _json_caption(where, members["json"][0], meta)
    if not caption:
        if "txt" in members:
            raise WeightportError(f"{where}: sample {key} has an empty caption ({members['txt'][0]} is "
                                  'blank and there is no "caption" in its .json)')
        raise WeightportError(f'{where}: sample {key} has no caption (no .txt member and no "caption" '
                              "in its .json)")
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    image = members[image_ext][1] if image_ext else None
    return CaptionSample(key=key, caption=caption, image=image, image_ext=image_ext, meta=meta)


def _utf8(where: Path, name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not part of the caption
    except UnicodeDecodeError:
        raise WeightportError(f"{where}: member {name} is not UTF-8") from None


def _parse_json(where: Path, name: str, data: bytes) -> dict:
    try:
        value = json.loads(_utf8(where, name, data))
    except json.JSONDecodeError as e:
        raise WeightportError(f"{where}: member {name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WeightportError(f"{where}: member {name} is not a JSON object (it is {_kind(value)})")
    return value


def _json_caption(where: Path, name: str, meta: dict) -> str:
    for field in JSON_CAPTION_FIELDS:
        value = meta.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise WeightportError(f'{where}: member {name} has a "{field}" that is {_kind(value)}, '
                                  "not a string")
        if value.strip():
            return value.strip()
    return ""


# --- datasets.save_to_disk folders ----------------------------------------------------


def _dataset_samples(path: Path) -> Iterator[CaptionSample]:
    try:
        import datasets
    except ImportError:
        raise WeightportError(f"{path}: reading a saved datasets folder needs the datasets package "
                              "(pip install datasets)") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    # datasets and pyarrow report a damaged folder with many unrelated exception types
    except Exception as e:  # noqa: BLE001
        raise WeightportError(f"{path}: cannot load the saved dataset ({_one_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) != 1:
            raise WeightportError(f"{path}: holds the splits {', '.join(splits)}; pass one split's "
                                  f"folder, e.g. {path / splits[0]}")
        dataset = dataset[splits[0]]
    columns = dataset.column_names
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_column is None:
        raise WeightportError(f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}; "
                              f"the columns are {', '.join(columns)})")
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column and isinstance(dataset.features[image_column], datasets.Image):
        # the stored bytes as they are, rather than decoding and re-encoding every image
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.select_columns([c for c in (caption_column, image_column) if c])
    for index, row in enumerate(dataset):  # rows are read lazily, so a limit stops early
        caption = row[caption_column]
        if caption is not None and not isinstance(caption, str):
            raise WeightportError(f'{path}: row {index}: column "{caption_column}" holds '
                                  f"{_kind(caption)}, not a string")
        if not caption or not caption.strip():
            raise WeightportError(f'{path}: row {index} has no caption (column "{caption_column}" is empty)')
        image, image_ext = _dataset_image(path, index, image_column, row.get(image_column))
        yield CaptionSample(key=str(index), caption=caption.strip(), image=image, image_ext=image_ext, meta={})


def _dataset_image(path: Path, index: int, column: str | None, value: Any) -> tuple[bytes | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, dict):  # an Image feature read without decoding: {"bytes", "path"}
        data, source = value.get("bytes"), value.get("path")
        if data is None and source:
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise WeightportError(f"{path}: row {index}: cannot read its image file {source} "
                                      f"({e.strerror or _one_line(e)})") from None
        if data is None:
            return None, None
        return data, _sniff_image(data) or (Path(source).suffix.lstrip(".").lower() if source else None)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), _sniff_image(value)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a decoded Pillow image
        out = io.BytesIO()
        value.save(out, format="PNG")
        return out.getvalue(), "png"
    raise WeightportError(f'{path}: row {index}: column "{column}" holds {_kind(value)}, not an image')


def _sniff_image(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


# --- helpers ----------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _kind(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
