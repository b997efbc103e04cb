"""A torch checkpoint file (torch.save's zip format) read without torch: tensors as numpy arrays.

torch.save writes a zip archive: `<root>/data.pkl` (a pickle whose tensors refer to storages by
key) and `<root>/data/<key>` (each storage's raw little-endian bytes). This reader unpickles
data.pkl with an allow-list: tensors and parameters become numpy arrays (their storage viewed
with the tensor's offset, shape and strides, then copied), containers stay containers, and any
other object a checkpoint's metadata may hold (an mmengine config, a numpy scalar, a class) is an
inert `Opaque` naming it. Nothing in the file is ever called, so a file from anywhere is safe.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from segnext_jax.errors import InputError

# torch's storage classes (what a tensor's storage is pickled as) -> numpy dtypes.
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(InputError):
  """A file that is not a readable torch zip checkpoint; one line naming it."""


class Opaque:
  """An object of a class this reader does not build (kept by name, never called)."""

  def __init__(self, name: str, *args: Any):
    self.name, self.args, self.state = name, args, None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"Opaque({self.name})"


def _opaque_class(name: str) -> type:
  return type("Opaque", (Opaque,), {"__init__": lambda self, *a: Opaque.__init__(self, name, *a),
                                    "__new__": lambda cls, *a, **k: object.__new__(cls)})


class _Storage:
  def __init__(self, data: np.ndarray):
    self.data = data


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_rest) -> np.ndarray:
  data = storage.data
  if not size:
    return data[offset:offset + 1].reshape(()).copy()
  if max(offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1, 0) > data.size:
    raise PthError(f"a tensor of shape {tuple(size)} reaches past its storage ({data.size} values)")
  view = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size),
                                         strides=tuple(s * data.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_rest) -> np.ndarray:
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix, self.storages = archive, prefix, {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in STORAGE_DTYPES:
      return STORAGE_DTYPES[name]
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, pid) -> _Storage:
    kind, dtype, key = pid[0], pid[1], str(pid[2])
    if kind != "storage" or not isinstance(dtype, type) or issubclass(dtype, Opaque):
      raise PthError(f"a storage of an unknown kind ({pid[:2]!r})")
    if key not in self.storages:
      raw = self.archive.read(f"{self.prefix}data/{key}")
      self.storages[key] = _Storage(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")))
    return self.storages[key]


def read(path: str | Path) -> Any:
  """The object torch.save wrote to `path` (zip format), its tensors as numpy arrays."""
  path = Path(path)
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise PthError(f"{path}: not a torch zip checkpoint ({e})") from None
  with archive:
    pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pkl:
      raise PthError(f"{path}: a zip archive without data.pkl, not a torch checkpoint")
    prefix = pkl[0][:-len("data.pkl")]
    names = set(archive.namelist())
    order = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
    if order != "little":
      raise PthError(f"{path}: written on a {order}-endian machine (not supported)")
    with archive.open(pkl[0]) as f:
      try:
        return _Unpickler(f, archive, prefix).load()
      except PthError as e:
        raise PthError(f"{path}: {e}") from None
      except (pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
        raise PthError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
