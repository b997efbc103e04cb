"""torch checkpoint files -> converted variables: the one module that reads .pth files.

Used by `convert/from_torch.py` and by `train.py --pretrained x.pth`; torch is imported lazily
(the `convert` extra), so the model, training and inference never need it.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

from segnext_jax import convert_map
from segnext_jax.convert_map import ConversionError, Report
from segnext_jax.model import abstract_variables, fixed_bases, segnext


# Leading bytes of files people pass by mistake, named in the refusal.
MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
         (b"\x1f\x8b", "a gzip archive"), (b"%PDF", "a PDF document"),
         (b"\x93NUMPY", "a NumPy .npy file"), (b"\x89HDF", "an HDF5 file"))


def sniff(path: Path) -> str | None:
  """Why `path` is not a torch checkpoint file, from its first bytes (None: it may be one).
  torch writes a zip archive (PK..) or, before 1.6, a bare pickle (0x80 ...)."""
  if path.is_dir():
    hint = (" (a segnext-jax checkpoint directory already: use it as it is)"
            if (path / "checkpoints").is_dir() else "")
    return f"a directory, not a torch checkpoint file{hint}"
  with open(path, "rb") as f:
    head = f.read(16)
  if not head:
    return "an empty file"
  if head.startswith(b"PK\x03\x04"):
    return None if zipfile.is_zipfile(path) else (
        "truncated or damaged (its zip archive has no central directory): copy it again")
  if head[:1] == b"\x80":
    return None
  for magic, kind in MAGIC:
    if head.startswith(magic):
      return f"{kind}, not a torch checkpoint"
  try:
    head.decode("utf-8")
    return "a text file, not a torch checkpoint"
  except UnicodeDecodeError:
    return "not a torch checkpoint (neither a zip archive nor a pickle)"


def load_torch(path: Path, trust_pickle: bool = False):
  """torch.load with weights_only=True; full unpickling only when explicitly trusted, and only
  suggested for a readable pickle that stores non-tensor objects. Without torch installed:
  pth_reader's allow-list reader (zip checkpoints, tensors as numpy, nothing in the file called)."""
  if not path.exists():
    raise ConversionError(f"{path}: no such file")
  why = sniff(path)
  if why:
    raise ConversionError(f"{path}: not a readable torch checkpoint ({why})")
  try:
    import torch  # optional: the `convert` extra
  except ImportError:
    return _read_without_torch(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "Unsupported global" in str(e) and not trust_pickle:
      raise ConversionError(
          f"{path}: needs full unpickling (it stores non-tensor objects: {_global(e)}); re-run "
          "with --trust-pickle only if you trust its source") from None
    raise ConversionError(f"{path}: not a readable torch checkpoint (damaged or truncated: "
                          f"{_first_line(e)})") from None
  except EOFError:
    raise ConversionError(f"{path}: not a readable torch checkpoint (truncated: it ends early)") from None
  except Exception as e:  # torch.load raises many types on garbage (IndexError, RuntimeError, ...)
    raise ConversionError(f"{path}: not a readable torch checkpoint (damaged or truncated: "
                          f"{_first_line(e)})") from None


def _read_without_torch(path: Path):
  from segnext_jax import pth_reader
  if not zipfile.is_zipfile(path):
    raise ConversionError(f"{path}: saved in torch's pre-1.6 format, which only torch reads: "
                          "pip install -e .[convert]")
  try:
    return pth_reader.read(path)
  except pth_reader.PthError as e:
    raise ConversionError(str(e)) from None


def _global(e: Exception) -> str:
  """The class a weights-only load refused ('GLOBAL pathlib.PosixPath' -> pathlib.PosixPath)."""
  m = re.search(r"GLOBAL (\S+)", str(e))
  return m.group(1) if m else "objects torch's safe loader refuses"


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _stored_bases(obj, shape: tuple[int, int]):
  """The fixed NMF bases a .pth written by convert/to_torch.py carries, if they fit the model."""
  meta = obj.get("meta") if isinstance(obj, dict) else None
  bases = (meta or {}).get("segnext_jax", {}).get("nmf_bases") if isinstance(meta, dict) else None
  if bases is None or tuple(bases.shape) != shape:
    return None
  return np.asarray(bases.detach().cpu().float().numpy() if hasattr(bases, "detach") else bases,
                    np.float32)


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert_file(path: str | Path, variant: str | None = None, nmf_rank: int | None = None,
                 nmf_seed: int = 0, trust_pickle: bool = False) -> tuple[dict, dict, Report]:
  """Load and convert a .pth: (variables incl. fixed NMF bases, metadata, report).

  variant: must agree with a released size; for a custom size (embed_dims, depths, head channels
  of no released variant, recorded in meta['model']) it names the base (default
  convert_map.CUSTOM_BASE). nmf_rank None: from the checkpoint's stored config, else its format's
  default (see convert_map.nmf_rank). Raises ConversionError with one line naming the problem."""
  path = Path(path)
  obj = load_torch(path, trust_pickle)
  sd, fmt = convert_map.unwrap_state_dict(obj)
  inferred, sizes, num_classes = convert_map.infer_model(sd, variant)
  backbone_only = "backbone" in fmt
  if nmf_rank is None:
    nmf_rank, rank_source = convert_map.nmf_rank(convert_map.stored_config(obj), fmt, inferred)
  else:
    rank_source = "given (--nmf-rank)"
  model_kw = {"nmf_rank": nmf_rank, **({"num_classes": num_classes} if num_classes else {}), **sizes}
  model = segnext(inferred, **model_kw)
  variables, ignored = convert_map.convert_state_dict(sd, abstract_variables(model),
                                                      backbone_only=backbone_only)
  stored = _stored_bases(obj, (model.head_channels, nmf_rank))
  if not backbone_only:
    variables.update(fixed_bases(model, nmf_seed))
    if stored is not None:  # written by convert/to_torch.py: keep the model's own bases
      variables["nmf_bases"]["decode_head"]["hamburger"]["bases"] = stored
  meta = dict(variant=inferred, model=model_kw, source_file=str(path.absolute()),
              source_sha256=sha256(path), source_format=fmt, backbone_only=backbone_only,
              ignored_keys=ignored, nmf_rank_source=rank_source,
              nmf_bases=None if backbone_only else (
                  "fixed, stored in the .pth (meta['segnext_jax'])" if stored is not None
                  else f"fixed, drawn from seed {nmf_seed}"))
  report = Report(fmt, inferred, num_classes, backbone_only, len(sd) - len(ignored), ignored,
                  nmf_rank, rank_source, sizes)
  return variables, meta, report
