"""Reads weights files of other frameworks into a flat {name: numpy array} dict, without torch and without running code.

    arrays = read_tensors("s3://models/r50.pth", endpoint_url="http://127.0.0.1:9000")
    arrays["backbone.conv1.weight"].shape  # (64, 3, 7, 7)

The format is chosen by the file's first bytes, not by its suffix:
  - PyTorch `torch.save` (.pth / .pt / .bin, torch >= 1.6): a zip archive with `<folder>/data.pkl` (a pickle whose
    tensors refer to storages by key), `<folder>/data/<key>` (each storage's raw bytes) and `<folder>/byteorder`.
    The older non-zip stream (a pickle sequence, or a tar of torch < 0.4) is refused with a note to re-save it.
  - detectron2 / Detectron / Caffe2 `.pkl`: a plain pickle of a dict of numpy arrays, often
    `{"model": {...}, "__author__": ..., "matching_heuristics": True}`; Python 2 pickles are read as latin1.
  - `.safetensors`: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (and
    `__metadata__`, ignored), then the raw little-endian data.
  - `.npz`: numpy's zip of `.npy` files, read with `allow_pickle=False`.

Pickles are read by a restricted unpickler. A pickle can name any importable callable (`os.system`,
`builtins.eval`, ...) and the standard unpickler calls it, so a downloaded checkpoint could run any code while it is
merely being read. Here only the globals that build arrays are resolved (to numpy-only stand-ins for torch's); any
other global raises UnsafeCheckpointError before it is imported, let alone called.

Checkpoints that wrap their weights (`{"model": ..., "optimizer": ..., "epoch": 3}`) are unwrapped through
WRAPPER_KEYS; nested dicts are flattened with "." between the keys; values that are not arrays are dropped, and what
was dropped or ignored is logged. bfloat16 becomes float32 (numpy has no native bfloat16); float16 stays float16.
"""

import _compat_pickle  # The Python 2 -> 3 names that pickle.Unpickler applies.
import io
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from panoptic_jax.data.storage import Storage, open_storage
from panoptic_jax.errors import UserError

# Keys under which checkpoints keep their weights (torch / timm / mmcv, deepspeed, Detectron's Caffe2 `blobs`).
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "blobs")


class UnsafeCheckpointError(UserError, ValueError):
  """A pickle in a weights file names a global other than the array builders: it would run code if loaded."""


class WeightsFileError(UserError, ValueError):
  """A weights file that is empty, corrupt, truncated or in no format that read_tensors knows."""


# ----------------------------------------------------------------------------------------------------------------------
# Restricted unpickling


class _StorageType:
  """Stands for `torch.<Kind>Storage` in a pickle: only its element type matters."""

  def __init__(self, name: str, dtype: Any):
    self.name, self.dtype = name, np.dtype(dtype)


_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: the view (offset and strides in elements) of a 1-D storage, copied.

  The view is checked to lie inside the storage before numpy is asked for it: as_strided itself would read any memory.
  """
  size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
  if not isinstance(storage, np.ndarray) or len(size) != len(stride) or min((offset, *size, *stride)) < 0:
    raise ValueError(f"a tensor of size {size}, stride {stride} at offset {offset} is malformed")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise ValueError(f"a tensor of size {size}, stride {stride} at offset {offset} reaches element {last} of a "
                     f"storage of {storage.size}")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_from_type(func: Any, _new_type: Any, args: tuple, _state: Any) -> Any:
  """torch._tensor._rebuild_from_type_v2: `func` came through find_class, so it is one of the allowed builders."""
  if func is not _rebuild_tensor:
    raise ValueError("_rebuild_from_type_v2 of something other than _rebuild_tensor_v2")
  return func(*args)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
  """_codecs.encode, as protocol-2 pickles of Python 3 write bytes; only the latin1 codec."""
  if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
    raise ValueError(f"_codecs.encode with {encoding!r}")
  return text.encode("latin1")


def _binary(kind: type) -> Any:
  """builtins.bytes / bytearray as pickles use them (nothing, or a str or bytes); never bytes(<huge int>)."""

  def build(*args: Any) -> Any:
    if args and not isinstance(args[0], (str, bytes, bytearray)):
      raise ValueError(f"{kind.__name__}() of something other than text or bytes")
    return kind(*args)

  return build


# numpy's array builders, found through numpy itself: numpy 1 names their module numpy.core, numpy 2 numpy._core.
_NUMPY_BUILDERS = {
    ("multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
    ("multiarray", "scalar"): np.float32(0).__reduce__()[0],
    ("numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],  # Protocol 5.
}
_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _binary(bytearray), ("builtins", "bytes"): _binary(bytes), ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): None, ("torch.nn.parameter", "Parameter"): None,  # Only as _rebuild_from_type_v2's type.
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _TORCH_STORAGES.items()},
    **{(f"numpy.{core}.{module}", name): fn for core in ("core", "_core") for (module, name), fn in _NUMPY_BUILDERS.items()},
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
  """The Python 3 name of a global that a protocol < 3 pickle wrote with its Python 2 name (as pickle.Unpickler)."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    return _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of _ALLOWED; storages (torch's persistent ids) come from `storages`."""

  def __init__(self, data: bytes, url: str, storages: Mapping[str, bytes] | None = None, big_endian: bool = False):
    super().__init__(io.BytesIO(data), encoding="latin1")  # latin1: numpy arrays pickled by Python 2.
    self.url, self.storages, self.big_endian = url, storages, big_endian
    self.loaded: dict[str, np.ndarray] = {}  # Storage key -> 1-D array; shared by the tensors that view it.

  def find_class(self, module: str, name: str) -> Any:
    key = _python3_name(module, name)
    if key not in _ALLOWED:
      written = f" (written as {module}.{name})" if key != (module, name) else ""
      raise UnsafeCheckpointError(
          f"{self.url}: refused to load the global {'.'.join(key)}{written}: a weights file may only build arrays and "
          "dicts, and loading this one would run code it names. If you trust the file, load it with its own "
          "framework and save the weights alone (a state_dict of tensors, or safetensors)")
    found = _ALLOWED[key]
    # A fresh storage type per file: BUILD could set attributes on a shared one and change how later files read.
    return _StorageType(found.name, found.dtype) if isinstance(found, _StorageType) else found

  def persistent_load(self, pid: Any) -> np.ndarray:
    """torch's ('storage', storage_type, key, location, numel): the storage's bytes as a 1-D array."""
    if self.storages is None:
      raise pickle.UnpicklingError(f"a persistent id {pid!r} outside a PyTorch archive")
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"an unknown persistent id {pid!r}")
    key = str(pid[2])
    if key not in self.loaded:
      if key not in self.storages:
        raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive's data/ folder")
      dtype = pid[1].dtype.newbyteorder(">") if self.big_endian else pid[1].dtype
      raw = self.storages[key]
      self.loaded[key] = np.frombuffer(raw, dtype, len(raw) // dtype.itemsize).astype(pid[1].dtype, copy=False)
    return self.loaded[key]


def _unpickle(data: bytes, url: str, storages: Mapping[str, bytes] | None = None, big_endian: bool = False) -> Any:
  try:
    return _RestrictedUnpickler(data, url, storages, big_endian).load()
  except (UnsafeCheckpointError, WeightsFileError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure of a corrupt pickle)
    raise WeightsFileError(f"{url}: expected a pickle of named arrays, found one that cannot be read "
                           f"({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------------
# Formats


def _read_zip(data: bytes, url: str) -> Any:
  """A PyTorch archive (a member `<folder>/data.pkl`) or an .npz (members `*.npy`)."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if pickles:
      prefix = pickles[0][:-len("data.pkl")]
      storages = {n[len(prefix) + 5:]: archive.read(n) for n in names if n.startswith(prefix + "data/")}
      byteorder = archive.read(prefix + "byteorder").strip() if prefix + "byteorder" in names else b"little"
      return _unpickle(archive.read(pickles[0]), url, storages, big_endian=byteorder == b"big")
    if names and all(n.endswith(".npy") for n in names):
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError) as e:
    if isinstance(e, UserError):
      raise
    raise WeightsFileError(f"{url}: expected a PyTorch checkpoint or .npz (a zip archive), found a zip that cannot "
                           f"be read, truncated or corrupt ({type(e).__name__}: {e})") from None
  shown = ", ".join(names[:10]) + (f", ... ({len(names)} members)" if len(names) > 10 else "")
  raise WeightsFileError(f"{url}: expected a PyTorch checkpoint (a zip with <folder>/data.pkl) or an .npz (only .npy "
                         f"members), found a zip with members [{shown}]")


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _safetensors_header_length(data: bytes) -> int | None:
  """The header length when `data` looks like safetensors (a JSON object after the 8-byte length), else None."""
  if len(data) < 10 or data[8:9] != b"{":
    return None
  length = int.from_bytes(data[:8], "little")
  return length if length <= len(data) - 8 else None


def _read_safetensors(data: bytes, url: str, header_length: int) -> dict[str, np.ndarray]:
  base = 8 + header_length
  try:
    header = json.loads(data[8:base])
    arrays = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {info['dtype']}; known: {', '.join(_SAFETENSORS_DTYPES)}")
      dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(int(n) for n in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
      count = math.prod(shape)
      if not 0 <= start <= end <= len(data) - base or end - start != count * dtype.itemsize or min(shape, default=0) < 0:
        raise ValueError(f"tensor {name!r} of {info['dtype']} {list(shape)} has data_offsets [{start}, {end}] in a "
                         f"data section of {len(data) - base} bytes")
      arrays[name] = np.frombuffer(data, dtype, count, base + start).reshape(shape).copy()
    return arrays
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise WeightsFileError(f"{url}: expected a safetensors file (JSON header of dtype, shape, data_offsets), found "
                           f"a malformed one ({type(e).__name__}: {e})") from None


# torch < 1.6 (and torch.save(..., _use_new_zipfile_serialization=False)): a pickle of this magic number comes first.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _decode(data: bytes, url: str) -> Any:
  """The file's content as Python objects: a (nested) dict whose leaves are arrays and other values."""
  if not data:
    raise WeightsFileError(f"{url}: expected a weights file, found an empty file")
  if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    return _read_zip(data, url)
  header_length = _safetensors_header_length(data)
  if header_length is not None:
    return _read_safetensors(data, url, header_length)
  if data.startswith(_LEGACY_TORCH_MAGIC) or data[257:262] == b"ustar":
    raise WeightsFileError(f"{url}: expected a PyTorch zip checkpoint, found the legacy torch.save format of torch "
                           "< 1.6; re-save it with a current torch: torch.save(torch.load(path), new_path)")
  if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5 or url.endswith((".pkl", ".pickle")):
    return _unpickle(data, url)
  raise WeightsFileError(f"{url}: expected a PyTorch checkpoint (zip), a pickle (.pkl), safetensors or .npz, found "
                         f"{len(data)} bytes starting {data[:16]!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Unwrapping and flattening


def _as_array(value: Any) -> np.ndarray | None:
  """A numeric array (bfloat16 as float32) for an array leaf; None for anything else."""
  if isinstance(value, np.generic):
    value = np.asarray(value)
  if not isinstance(value, np.ndarray):
    return None
  if value.dtype == ml_dtypes.bfloat16:
    return value.astype(np.float32)
  if value.dtype.kind not in "biufc":
    return None
  return value if value.flags.writeable else value.copy()  # Protocol 5 pickles view their (read-only) bytes.


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> int:
  """Adds the array leaves of `tree` to `out` under dotted names; returns the number of other leaves dropped."""
  if isinstance(tree, Mapping):
    return sum(_flatten(value, f"{prefix}{key}.", out) for key, value in tree.items())
  array = _as_array(tree)
  if array is None:
    return 1
  name = prefix[:-1]
  if name in out:
    raise ValueError(f"two arrays flatten to the name {name!r}")
  out[name] = array
  return 0


def _has_arrays(tree: Any) -> bool:
  if isinstance(tree, Mapping):
    return any(_has_arrays(value) for value in tree.values())
  return _as_array(tree) is not None


def open_file_location(location: str | os.PathLike[str], endpoint_url: str | None = None) -> tuple[Storage, str]:
  """The storage of a file's folder and the file's name in it (a local path, `file://` or `s3://` location)."""
  location = os.fspath(location)
  parent, name = location.rpartition("/")[::2] if "://" in location else os.path.split(location)
  if not name:
    raise WeightsFileError(f"{location}: expected the location of a weights file, found a folder")
  return open_storage(parent or ".", endpoint_url), name


def read_tensors(location: "str | os.PathLike[str]", endpoint_url: str | None = None) -> dict[str, np.ndarray]:
  """Reads a weights file into {name: array}; see the module docstring for the formats.

  Args:
    location: a local path, `file://` URL or `s3://bucket/key` of a .pth / .pt / .bin / .pkl / .safetensors / .npz.
    endpoint_url: the S3 endpoint (see panoptic_jax.data.storage.open_storage).

  Returns:
    The arrays by name: nested dicts joined with ".", after unwrapping the one WRAPPER_KEYS entry that holds arrays
    (if the top level has exactly one). Every array owns its memory; bfloat16 is float32, float16 stays float16.

  Raises:
    StorageError: the file is missing or cannot be read.
    UnsafeCheckpointError: a pickle in the file names a global other than the array builders.
    WeightsFileError: the file is empty, corrupt, in an unknown format, or holds no arrays.
  """
  storage, name = open_file_location(location, endpoint_url)
  url = storage.url(name)
  tree = _decode(storage.read_bytes(name), url)
  if not isinstance(tree, Mapping):
    raise WeightsFileError(f"{url}: expected a dict of named arrays, found a {type(tree).__name__}")
  ignored, path = [], []
  while isinstance(tree, Mapping):
    wrappers = [k for k in WRAPPER_KEYS if isinstance(tree.get(k), Mapping) and _has_arrays(tree[k])]
    if len(wrappers) != 1:
      break
    ignored += [".".join([*path, str(k)]) + (" (with arrays)" if _has_arrays(v) else "") for k, v in tree.items()
                if k != wrappers[0]]
    path.append(wrappers[0])
    tree = tree[wrappers[0]]
  arrays: dict[str, np.ndarray] = {}
  try:
    dropped = _flatten(tree, "", arrays)
  except ValueError as e:
    raise WeightsFileError(f"{url}: expected unique names, found {e}") from None
  if not arrays:
    raise WeightsFileError(f"{url}: expected named arrays, found none ({dropped} other values)")
  logging.info("%s: %d array(s)%s%s%s", url, len(arrays), f" from {'.'.join(path)!r}" if path else "",
               f"; ignored keys {', '.join(ignored)}" if ignored else "",
               f"; dropped {dropped} value(s) that are not arrays" if dropped else "")
  return arrays
