"""PyTorch zip checkpoints (.pth / .bin): read lazily and safely, written as a stream.

Reading always uses `weights_only=True`, so a pickle that would run code is refused, and
`mmap=True`, so opening reads nothing but the pickle. Tensor data is then read with `pread`
at each record's offset in the zip (torch stores records uncompressed), so no mapped pages
accumulate in the resident set; where offsets cannot be matched to storages, the tensor is
copied out of the mapping in chunks whose pages are handed back to the kernel as it goes.
With mmap, torch skips checks it makes without it (a storage's size against its record's, the
zip local headers); those are made here, so a file torch.load refuses is refused here too
(fuzz/differential.py compares the two on mutated files).
"""

from __future__ import annotations

import collections
import ctypes
import io
import mmap
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import WeightportError
from .hashed_file import HashedFile
from .pickle_scan import globals_in_torch_zip
from .pread import RangeFile

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux: pages are simply left to the kernel
    _madvise = None

# wrappers that training loops put around the state dict; the first one found is unwrapped
WRAPPER_KEYS = ("model", "state_dict", "module")
# torch.compile leaves this in every key of a compiled module's state dict
_COMPILE_PREFIX = "_orig_mod."
_CHUNK = 64 * 2**20


def _drop_pages(t: torch.Tensor) -> None:
    """Let the kernel reclaim the mapped file pages behind `t` (it re-reads them if touched)."""
    if _madvise is None:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = start - start % _PAGE
    hi = end + (-end % _PAGE)
    _madvise(lo, hi - lo, _MADV_DONTNEED)


def _flatten_state(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise WeightportError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            if not isinstance(k, str):  # differential fuzzing found an AttributeError here
                raise WeightportError(f"{path}: a tensor is stored under the key {str(k)[:60]!r}, which is "
                                      f"{type(k).__name__}, not a string")
            name = k.removeprefix(_COMPILE_PREFIX)
            if name in tensors:
                raise WeightportError(f"{path}: tensor {name} appears twice (with and without {_COMPILE_PREFIX})")
            tensors[name] = v
    if not tensors:
        raise WeightportError(f"{path}: holds no tensors")
    return tensors


# Training checkpoints pickle bookkeeping objects beside the weights (mmengine's HistoryBuffer,
# numpy scalars, DeepSpeed's loss scaler and ZeRO stage enum, argparse namespaces). The
# weights-only unpickler refuses them; these packages' globals are instead bound to inert
# stand-ins, which record their arguments and never import or run the real class. Any other
# global (os.system and the like) is still refused.
INERT_PACKAGES = ("numpy", "mmengine", "deepspeed", "xtuner", "transformers", "peft", "accelerate", "argparse",
                  "torch", "collections", "enum", "datetime", "pathlib")
# mmengine's HistoryBuffer pickles its statistics methods as getattr(HistoryBuffer, "min"); the
# stand-in records the call and never looks anything up
INERT_GLOBALS = ("builtins.getattr",)


class Inert:
    """Stands for a pickled object of a class that is never imported."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _torch_allowed() -> set[str]:
    """The globals torch's weights-only unpickler itself allows (bytes, sets, OrderedDict, ...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return set(_get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper: its few non-torch entries as of torch 2.13
        return {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray",
                "builtins.set", "builtins.complex"}


def _inert(name: str) -> bool:
    return name.split(".")[0] in INERT_PACKAGES or name in INERT_GLOBALS


def load_weights_only(path: Path) -> object:
    """torch.load(weights_only=True, mmap=True), with training bookkeeping globals as Inert.

    A pickle that calls anything else is refused, naming what it would call (read from its
    opcodes, never by running it)."""
    return _load_weights_only(path)[0]


def _load_weights_only(path: Path) -> tuple[object, list]:
    """(the loaded object, the stand-ins it needed)."""
    try:
        with warnings.catch_warnings():  # a protocol-4 pickle is refused below, not warned about
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), []
    except pickle.UnpicklingError as e:
        refusal = str(e).strip().splitlines()
    allowed = _torch_allowed()
    unsafe = [n for n in globals_in_torch_zip(path) if not _inert(n) and n not in allowed]
    try:  # the globals torch's own allowlist lacks: those get stand-ins
        names = [] if unsafe else torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, ValueError):
        names = []
    if unsafe or not names or not all(_inert(n) for n in names):
        detail = (f"it would call {', '.join(unsafe)}" if unsafe else
                  next((ln for ln in refusal if "Unsupported" in ln or "global" in ln.lower()), refusal[0] if refusal else ""))
        raise WeightportError(f"{path}: refused, the pickle is not weights-only and would run code ({detail.strip()})")
    stand_ins = [(type(n.rsplit(".", 1)[-1], (Inert,), {"__module__": "weightport.inert"}), n) for n in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), stand_ins


def zip_members(path: Path) -> list[zipfile.ZipInfo]:
    """The zip's directory, refusing a name listed twice (which one a zip reader takes differs)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError) as e:
        # torch's own zip reader is more lenient; the members cannot be checked without the directory
        raise WeightportError(f"{path}: cannot read the zip directory ({first_line(e)})") from None
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise WeightportError(f"{path}: zip member {twice} appears twice")
    return infos


# besides the storages' data/<key> records, what torch.load reads from the zip
_TORCH_READS = ("data.pkl", ".format_version", ".storage_alignment", "byteorder", "version", ".data/version",
                ".data/serialization_id")


def _relative(infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Members by their name inside the archive's folder (torch names records relative to it)."""
    folder = infos[0].filename.split("/", 1)[0] + "/" if infos and "/" in infos[0].filename else ""
    return {i.filename.removeprefix(folder): i for i in infos}


def check_fixed_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """_check_members for the pickle and the few small records torch.load reads besides the data."""
    rel = _relative(infos)
    _check_members(path, [rel[n] for n in _TORCH_READS if n in rel])


def check_storage_records(path: Path, stand_ins: list, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse a storage whose record is not exactly its size, or not a plain stored member.

    torch.load without mmap refuses such a file ("record size does not match expected size"), but
    with mmap=True it takes each storage's bytes from where its record starts, whatever the
    record's size: a storage larger than its record reads the next record's bytes (differential
    fuzzing against torch.load found this). This replays the pickle with torch's own weights-only
    unpickler, every storage on the meta device (so no data is read), and checks each storage it
    asks for against its record, as torch does without mmap."""
    from torch import _weights_only_unpickler

    reader = torch._C.PyTorchFileReader(str(path))
    cached: dict[str, object] = {}
    read: set[str] = set()

    def persistent_load(saved_id):
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise RuntimeError(f"persistent id {saved_id!r:.60} is not a storage")
        typename, storage_type, key, location, numel = saved_id
        if key in cached:  # as torch.load: the storage already loaded under this key, whatever is asked now
            return cached[key]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch._utils._element_size(dtype)
        size = reader.get_record_size(f"data/{key}")
        if size != nbytes:
            raise WeightportError(f"{path}: storage {key}: its record data/{key} holds {size} bytes, the pickle "
                                  f"reads {nbytes} ({numel} x {str(dtype).removeprefix('torch.')}) from it")
        typed = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes, device="meta"), dtype=dtype,
                                           _internal=True)
        if nbytes:  # torch caches a storage with data; an empty one is looked up (and checked) again
            cached[key] = typed
        read.add(f"data/{key}")
        return typed

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(reader.get_record("data.pkl")), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    with warnings.catch_warnings(), torch.serialization.safe_globals(stand_ins):
        warnings.simplefilter("ignore")
        unpickler.load()
    rel = _relative(infos)
    _check_members(path, [rel[n] for n in sorted(read) if n in rel])


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """What torch's zip reader (miniz) checks when it extracts a member (as torch.load does without
    mmap) and skips when it maps one: a local header with its signature and the directory's flags
    and method, data inside the file, no encryption, not a directory. Where one of these fails,
    torch.load returned uninitialized memory as the member's bytes (differential fuzzing found
    garbage tensors and a random serialization id). A compressed member is refused too: no
    torch.save writes one, and mapped, torch would read its compressed bytes as the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        for info in infos:
            name = info.filename
            if not info.compress_size and not info.file_size:  # miniz extracts it without looking at it
                continue
            if info.external_attr & 0x10 or name.endswith("/"):  # miniz returns nothing for a directory
                raise WeightportError(f"{path}: zip member {name} is marked as a directory")
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise WeightportError(f"{path}: zip member {name}: corrupt local header")
            flags, method = int.from_bytes(local[6:8], "little"), int.from_bytes(local[8:10], "little")
            if (flags, method) != (info.flag_bits, info.compress_type):
                raise WeightportError(f"{path}: zip member {name}: local header (flags {flags:#x}, method {method}) "
                                      f"disagrees with the zip directory (flags {info.flag_bits:#x}, method "
                                      f"{info.compress_type})")
            if info.flag_bits & 0x61:
                raise WeightportError(f"{path}: zip member {name} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise WeightportError(f"{path}: zip member {name} is compressed (method {info.compress_type}, "
                                      f"{info.compress_size} of {info.file_size} bytes); torch.save stores members "
                                      "uncompressed")
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.compress_size > size:
                raise WeightportError(f"{path}: zip member {name} runs past the end of the file (truncated)")


def _byteorder(path: Path) -> bytes:
    reader = torch._C.PyTorchFileReader(str(path))
    return reader.get_record("byteorder") if reader.has_record("byteorder") else b"little"


class TorchFile(RangeFile):
    """A torch.save'd state dict, opened without reading its tensor data."""

    def __init__(self, path: Path):
        super().__init__(path)
        if not _is_zip(self.path):
            raise WeightportError(
                f"{self.path}: not a zip-format torch checkpoint (legacy or truncated file); "
                "re-save it with torch.save, or convert it to safetensors first")
        try:
            infos = zip_members(self.path)
            check_fixed_members(self.path, infos)
            obj, stand_ins = _load_weights_only(self.path)
            check_storage_records(self.path, stand_ins, infos)
            little = _byteorder(self.path) == b"little"
        except WeightportError:
            raise
        # torch.load fails on corrupt files with many exception types (fuzzing found Attribute-, Type-, KeyError)
        except Exception as e:  # noqa: BLE001
            raise WeightportError(f"{self.path}: cannot read torch checkpoint ({first_line(e)})") from None
        self._tensors = _flatten_state(obj, self.path)
        self.entries = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}
        # torch byte-swaps a big-endian file's storages in its (private) mapping: reading the file by range
        # would miss that, and handing the pages back would drop it, so the file's bytes would come back
        # for a tied tensor read second (differential fuzzing found both)
        self._little = little
        self._base = self._mapping_base() if little else None

    def _mapping_base(self) -> int | None:
        """Address of file offset 0 in torch's mapping, if every storage matches a data record.

        torch maps the whole file and each storage starts at its record's data offset, so
        sorted storages and sorted records pair up with one constant difference. Any doubt
        (unused records, odd layouts) returns None and loading falls back to the mapping.
        """
        storages = {}
        for t in self._tensors.values():
            s = t.untyped_storage()
            if s.nbytes():
                storages[s.data_ptr()] = s.nbytes()
        try:
            records = sorted(_data_records(self.path))
        except (OSError, zipfile.BadZipFile, struct.error, NotImplementedError, ValueError):  # odd zips: no fast path
            return None
        ptrs = sorted(storages.items())
        if len(ptrs) != len(records) or not ptrs:
            return None
        base = ptrs[0][0] - records[0][0]
        for (ptr, size), (offset, rsize) in zip(ptrs, records):
            if size != rsize or ptr - base != offset:
                return None
        return base

    def locate(self, name: str):
        t = self._tensors[name]
        if self._base is None or not t.is_contiguous() or not t.numel():
            return None
        offset = t.untyped_storage().data_ptr() - self._base + t.storage_offset() * t.element_size()
        return offset, tuple(t.shape), t.dtype

    def load(self, name: str) -> torch.Tensor:
        if self.locate(name) is not None:
            return self.read(name)
        try:
            return _copy_out(self._tensors[name], drop=self._little)
        except RuntimeError as e:  # a record shorter than its tensor: the file was cut
            raise self._fail(f"cannot read tensor {name} ({str(e).splitlines()[0]})") from None

    def shares_storage(self, a: str, b: str) -> bool:
        """True when two names were saved as one storage (how torch.save keeps tied weights)."""
        ta, tb = self._tensors.get(a), self._tensors.get(b)
        return (ta is not None and tb is not None and ta.shape == tb.shape
                and ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
                and ta.storage_offset() == tb.storage_offset())

    def close(self) -> None:
        self._tensors = {}
        super().close()


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has no message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # an end record that claims multiple disks, and the like
        return False


def _data_records(path: Path) -> list[tuple[int, int]]:
    """(data offset, size) of every tensor-data record ("<archive>/data/<key>") in a torch zip."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data" or info.compress_type != zipfile.ZIP_STORED:
                continue
            if not info.file_size:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def _copy_out(t: torch.Tensor, drop: bool = True) -> torch.Tensor:
    """Copy a mapped tensor out in chunks, releasing each chunk's pages after the copy (unless the
    mapping holds changes the file lacks: then dropping its pages would undo them)."""
    release = _drop_pages if drop else (lambda _: None)
    if not t.is_contiguous():
        out = t.clone(memory_format=torch.contiguous_format)
        release(t)
        return out
    src = t.reshape(-1)
    out = torch.empty_like(src)
    step = max(1, _CHUNK // max(1, t.element_size()))
    for i in range(0, src.numel(), step):
        out[i:i + step].copy_(src[i:i + step])
        release(src[i:i + step])
    return out.reshape(t.shape)


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as a tensor does, pointing at a storage record already in the archive."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class TorchZipWriter:
    """Writes a flat {name: tensor} torch checkpoint record by record.

    The result is what `torch.save(state_dict)` produces: `torch.load` reads it, with
    `weights_only=True` and `mmap=True`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = HashedFile(self.path)
        self._zip = torch._C.PyTorchFileWriter(self._file)
        self._state: dict[str, _TensorRef] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        key = str(len(self._state))
        self._zip.write_record(f"data/{key}", t.untyped_storage(), t.untyped_storage().nbytes())
        self._state[name] = _TensorRef(_StorageRef(key, t.dtype, t.numel()), t.shape)

    def alias(self, name: str, existing: str) -> None:
        """Store `name` as the same storage as `existing`, as torch.save does for tied weights."""
        self._state[name] = self._state[existing]

    def close(self) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(self._state)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record("byteorder", b"little", len(b"little"))
        self._zip.write_end_of_file()
        self._file.close()

    def abort(self) -> None:
        try:
            self._zip.write_end_of_file()
        except RuntimeError:
            pass
        self._file.abort()
