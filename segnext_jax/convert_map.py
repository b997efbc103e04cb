"""mmseg / official-SegNeXt torch state_dict -> flax `{'params', 'batch_stats'}`, as data tables.

numpy only (no torch import). Flax module names equal mmseg's attribute names, so a torch key
`<module path>.<leaf>` maps by (1) MODULE_RULES rewriting the module path, then (2) LEAF_RULES
choosing the flax collection / leaf / transform by the kind of the TARGET module (conv or norm),
never by the tensor's ndim. Every source tensor is used once or explicitly ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from segnext_jax.model import VARIANTS, abstract_variables, segnext

# (regex on the torch module path, replacement) - applied in order, each at most once.
MODULE_RULES: list[tuple[str, str]] = [
    (r"\.mlp\.dwconv\.dwconv$", r".mlp.dwconv"),                 # official repo -> mmseg 1.x
    (r"^backbone\.patch_embed1\.proj\.(\d)$", r"backbone.patch_embed1.proj_\1"),  # stem Sequential
    (r"^backbone\.block(\d)\.(\d+)\.", r"backbone.block\1_\2."),  # ModuleList index -> block{s}_{i}
]

def _oihw_to_hwio(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.transpose(2, 3, 1, 0))


def _same(t: np.ndarray) -> np.ndarray:
  return t

# torch leaf -> {target module kind: (collection, flax leaf, transform)}.
LEAF_RULES: dict[str, dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray]]]] = {
    "weight": {"conv": ("params", "kernel", _oihw_to_hwio), "norm": ("params", "scale", _same)},
    "bias": {"conv": ("params", "bias", _same), "norm": ("params", "bias", _same)},
    "running_mean": {"norm": ("batch_stats", "mean", _same)},
    "running_var": {"norm": ("batch_stats", "var", _same)},
}
# Module-level parameters (no leaf suffix in torch): the key itself is the flax param.
PARAM_LEAVES = ("layer_scale_1", "layer_scale_2")
# Source keys that carry no model state; dropped and reported.
IGNORED = [r"(^|\.)num_batches_tracked$", r"^head\.", r"^auxiliary_head\."]


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message names every offending key."""


@dataclasses.dataclass
class Report:
  """What a conversion did: the detected format, the model config and the ignored keys."""
  source_format: str
  variant: str
  num_classes: int | None
  backbone_only: bool
  converted: int
  ignored: list[str]


def unwrap_state_dict(obj: Any) -> tuple[dict[str, np.ndarray], str]:
  """Find the state dict in a loaded checkpoint ({'state_dict'|'model'|...} or bare)."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f"checkpoint is a {type(obj).__name__}, not a dict of tensors")
  for wrapper in ("state_dict", "model", "module"):
    if wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  sd = {}
  for k, v in obj.items():
    if not isinstance(k, str) or not hasattr(v, "shape"):
      raise ConversionError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor")
    sd[k] = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
  if not sd:
    raise ConversionError("checkpoint holds no tensors")
  return sd, _detect_format(sd)


def _detect_format(sd: Mapping[str, Any]) -> str:
  official = any(".mlp.dwconv.dwconv." in k for k in sd)
  if any(k.startswith("backbone.") for k in sd):
    return "official SegNeXt segmentor" if official else "mmseg segmentor"
  if any(k.startswith("patch_embed1.") for k in sd):
    return "official MSCAN backbone" if official else "mmseg MSCAN backbone"
  raise ConversionError("no SegNeXt key found (expected 'backbone.patch_embed1.*' or "
                        f"'patch_embed1.*'); first keys: {sorted(sd)[:3]}")


def infer_config(sd: Mapping[str, np.ndarray]) -> tuple[str, int | None]:
  """Variant from the backbone tensor shapes and block counts; num_classes from conv_seg."""
  pre = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
  dims, depths = [], []
  for s in range(1, 5):
    key = f"{pre}norm{s}.weight"
    if key not in sd:
      raise ConversionError(f"missing tensor {key!r}: cannot infer the MSCAN variant")
    dims.append(int(sd[key].shape[0]))
    blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(pre)}block{s}\.(\d+)\.", k))}
    depths.append(max(blocks) + 1 if blocks else 0)
  for name, row in VARIANTS.items():
    if tuple(dims) == row["embed_dims"] and tuple(depths) == row["depths"]:
      head = sd.get("decode_head.conv_seg.weight")
      return name, (int(head.shape[0]) if head is not None else None)
  raise ConversionError(f"no SegNeXt variant has embed_dims {tuple(dims)} and depths {tuple(depths)}")


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, prefix + (k,)) if isinstance(v, Mapping) else {prefix + (k,): v})
  return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def map_key(key: str, target: Mapping[tuple, Any]) -> tuple[tuple, Callable] | None:
  """torch key -> (flax path incl. collection, transform), using the target tree for the kind."""
  module, _, leaf = key.rpartition(".")
  if leaf in PARAM_LEAVES:
    module, leaf = f"{module}.{leaf}", ""
  for pattern, repl in MODULE_RULES:
    module = re.sub(pattern, repl, module)
  path = tuple(module.split("."))
  if not leaf:
    return (("params",) + path, _same) if ("params",) + path in target else None
  kind = "conv" if ("params",) + path + ("kernel",) in target else "norm"
  rule = LEAF_RULES.get(leaf, {}).get(kind)
  if rule is None:
    return None
  collection, flax_leaf, fn = rule
  return (collection,) + path + (flax_leaf,), fn


def convert_state_dict(sd: Mapping[str, np.ndarray], target: Mapping[str, Any],
                       backbone_only: bool = False) -> tuple[dict, list[str]]:
  """Map every tensor onto `target` (a variables tree of arrays or ShapeDtypeStructs).

  backbone_only: the source is a bare MSCAN (keys without 'backbone.'); only the backbone part of
  `target` must be covered. Returns (variables, ignored keys); raises ConversionError listing all
  missing, unexpected and mis-shaped tensors.
  """
  flat_target = flatten(target)
  if backbone_only:
    flat_target = {p: v for p, v in flat_target.items() if p[1] == "backbone"}
  out, ignored, unexpected, bad_shape, seen, bad_paths = {}, [], [], [], {}, set()
  for key in sorted(sd):
    if any(re.search(p, key) for p in IGNORED):
      ignored.append(key)
      continue
    src = f"backbone.{key}" if backbone_only else key
    mapped = map_key(src, flat_target)
    if mapped is None or mapped[0] not in flat_target:
      unexpected.append(key)
      continue
    path, fn = mapped
    if path in seen:
      unexpected.append(f"{key} (duplicate of {seen[path]})")
      continue
    value = fn(np.asarray(sd[key], np.float32))
    want = tuple(flat_target[path].shape)
    if value.shape != want:
      bad_shape.append(f"{key} {tuple(sd[key].shape)} (-> {'/'.join(path)} expects {want})")
      bad_paths.add(path)
      continue
    seen[path] = key
    out[path] = value
  missing = ["/".join(p) for p in flat_target if p not in out and p not in bad_paths]
  problems = []
  for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
    if items:
      problems.append(f"{len(items)} {label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
  if problems:
    raise ConversionError("; ".join(problems))
  return unflatten(out), ignored


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_torch(path: Path, trust_pickle: bool = False):
  """torch.load with weights_only=True; full unpickling only when explicitly trusted."""
  import torch  # conversion-only dependency
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "weights_only" in str(e) and not trust_pickle:
      raise ConversionError(
          f"{path}: needs full unpickling (it stores non-tensor objects); re-run with "
          "--trust-pickle only if you trust its source") from None
    raise ConversionError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
  except Exception as e:  # torch.load raises many types on garbage (KeyError, EOFError, ...)
    raise ConversionError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def convert_file(path: str | Path, variant: str | None = None, nmf_rank: int = 16,
            trust_pickle: bool = False) :
  """Load and convert a checkpoint: returns (variables, metadata, report); raises ConversionError."""
  path = Path(path)
  sd, fmt = unwrap_state_dict(load_torch(path, trust_pickle))
  inferred, num_classes = infer_config(sd)
  if variant is not None and variant.lower() != inferred:
    raise ConversionError(
        f"--variant={variant} disagrees with the checkpoint's shapes, which are variant {inferred!r}")
  backbone_only = "backbone" in fmt
  model_kw = {"nmf_rank": nmf_rank, **({"num_classes": num_classes} if num_classes else {})}
  target = abstract_variables(segnext(inferred, **model_kw))
  variables, ignored = convert_state_dict(sd, target, backbone_only=backbone_only)
  meta = dict(variant=inferred, model=model_kw, source_file=str(path.absolute()),
              source_sha256=sha256(path), source_format=fmt, backbone_only=backbone_only,
              ignored_keys=ignored)
  report = Report(fmt, inferred, num_classes, backbone_only,
                              len(sd) - len(ignored), ignored)
  return variables, meta, report
