"""mmseg / official-SegNeXt torch state_dict -> flax `{'params', 'batch_stats'}`, as data tables.

numpy only (no torch import; torch file I/O lives in `torch_io.py`). Flax module names equal mmseg's attribute names, so a torch key
`<module path>.<leaf>` maps by (1) MODULE_RULES rewriting the module path, then (2) LEAF_RULES
choosing the flax collection / leaf / transform by the kind of the TARGET module (conv or norm),
never by the tensor's ndim. Every source tensor is used once or explicitly ignored.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from segnext_jax.errors import InputError
from segnext_jax.ham_head import GN_GROUPS
from segnext_jax.model import VARIANTS

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
# The flax collections a torch state_dict fills ('nmf_bases' is ours: not in any torch file).
MAPPED_COLLECTIONS = ("params", "batch_stats")
# Source keys that carry no model state; dropped and reported.
IGNORED = [r"(^|\.)num_batches_tracked$", r"^head\.", r"^auxiliary_head\."]


class ConversionError(InputError):
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
  nmf_rank: int = 16
  nmf_rank_source: str = ""
  custom_size: dict[str, Any] = dataclasses.field(default_factory=dict)  # {} for a released size


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
  return sd, detect_format(sd)


def detect_format(sd: Mapping[str, Any]) -> str:
  """'mmseg segmentor' | 'official SegNeXt segmentor' | 'mmseg MSCAN backbone' | 'official MSCAN backbone'."""
  official = any(".mlp.dwconv.dwconv." in k for k in sd)
  if any(k.startswith("backbone.") for k in sd):
    return "official SegNeXt segmentor" if official else "mmseg segmentor"
  if any(k.startswith("patch_embed1.") for k in sd):
    return "official MSCAN backbone" if official else "mmseg MSCAN backbone"
  raise ConversionError("no SegNeXt key found (expected 'backbone.patch_embed1.*' or "
                        f"'patch_embed1.*'); first keys: {sorted(sd)[:3]}")


# NMF rank R is a config choice, not a tensor shape. The Hamburger default (mmseg 1.x and the
# official repository alike) is MD_R=64; mmseg 1.x's SegNeXt configs set 16 for every variant,
# the official repository's only for T and S (its B and L configs leave the default).
HAMBURGER_DEFAULT_RANK = 64
DEFAULT_RANK = {  # (source format, variant) -> rank, when the checkpoint stores no config
    **{("mmseg segmentor", v): 16 for v in "tsbl"},
    **{("official SegNeXt segmentor", v): r for v, r in zip("tsbl", (16, 16, 64, 64))},
}
_MD_R = re.compile(r"""MD_R['"]?\s*[=:]\s*(\d+)""")


def nmf_rank(config_text: str | None, fmt: str, variant: str) -> tuple[int, str]:
  """(R, why) for a checkpoint: its stored config's MD_R if it has one, the Hamburger default if
  its config sets none, else the default of its source format and variant."""
  if config_text and (m := _MD_R.search(config_text)):
    return int(m.group(1)), "read from the checkpoint's stored config (MD_R)"
  if config_text and re.search(r"LightHamHead|ham_kwargs", config_text):
    return HAMBURGER_DEFAULT_RANK, "the checkpoint's stored config sets no MD_R: Hamburger default"
  rank = DEFAULT_RANK.get((fmt, variant), 16)
  return rank, f"no stored config: {fmt} {variant.upper()} configs use {rank}"


def stored_config(obj: Any) -> str | None:
  """The config text an mmcv/mmengine checkpoint keeps in meta['config'] / meta['cfg']."""
  meta = obj.get("meta") if isinstance(obj, Mapping) else None
  if isinstance(meta, Mapping):
    for key in ("config", "cfg"):
      if isinstance(meta.get(key), str):
        return meta[key]
  return None


# A checkpoint whose sizes are no released variant's (a "custom size") is built on this base
# variant, whose other settings (drop_path) apply, with its own sizes as overrides; `--variant`
# names another base.
CUSTOM_BASE = "t"
SIZE_KEYS = ("embed_dims", "depths", "head_channels")  # what a custom size overrides


def _channels(sd: Mapping[str, np.ndarray], key: str, check: str, what: str) -> int:
  """The leading dim of `key`, which the leading dim of `check` must equal (else one line naming
  both), so that a damaged tensor is named rather than every tensor that disagrees with it."""
  if key not in sd:
    raise ConversionError(f"missing tensor {key!r}: cannot infer the {what}")
  n = int(sd[key].shape[0]) if sd[key].ndim else 0
  if check in sd and (sd[check].ndim == 0 or int(sd[check].shape[0]) != n):
    raise ConversionError(f"inconsistent shapes: {key} {tuple(sd[key].shape)} and {check} "
                          f"{tuple(sd[check].shape)} must have the same {what}")
  return n


def infer_sizes(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], int | None]:
  """({'embed_dims', 'depths'[, 'head_channels']}, num_classes) from the tensor shapes; a bare
  backbone has no head, so no head_channels and no num_classes."""
  pre = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
  dims, depths = [], []
  for s in range(1, 5):
    dims.append(_channels(sd, f"{pre}norm{s}.weight", f"{pre}patch_embed{s}.norm.weight"
                          if s > 1 else f"{pre}patch_embed1.proj.4.weight", "MSCAN embed_dims"))
    blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(pre)}block{s}\.(\d+)\.", k))}
    if not blocks:
      raise ConversionError(f"no tensor {pre}block{s}.0.*: cannot infer the depth of MSCAN stage {s}")
    depths.append(max(blocks) + 1)
  sizes: dict[str, Any] = dict(embed_dims=tuple(dims), depths=tuple(depths))
  head = sd.get("decode_head.conv_seg.weight")
  key = "decode_head.squeeze.conv.weight"  # absent: convert_state_dict names it missing
  if key in sd:
    channels = _channels(sd, key, "decode_head.squeeze.gn.weight", "head channels")
    if channels % GN_GROUPS:
      raise ConversionError(f"{key} {tuple(sd[key].shape)}: head channels {channels} are not a "
                            f"multiple of the GroupNorm's {GN_GROUPS} groups")
    sizes["head_channels"] = channels
  return sizes, (int(head.shape[0]) if head is not None else None)


def released_variant(sizes: Mapping[str, Any]) -> str | None:
  """The released variant whose embed_dims, depths and (if given) head_channels these are; None
  for a custom size."""
  return next((name for name, row in VARIANTS.items()
               if all(row[k] == v for k, v in sizes.items())), None)


def describe_size(sizes: Mapping[str, Any]) -> str:
  """'embed_dims (8, 16, 32, 32), depths (1, 1, 1, 1), head_channels 32'."""
  return ", ".join(f"{k} {tuple(v) if isinstance(v, (list, tuple)) else v}" for k, v in sizes.items())


def infer_model(sd: Mapping[str, np.ndarray],
                base: str | None = None) -> tuple[str, dict[str, Any], int | None]:
  """(variant, size overrides, num_classes) from the tensor shapes. A released size: its variant
  and no overrides (`base`, if given, must be that variant). A custom size: `base` (default
  CUSTOM_BASE) with embed_dims, depths and head_channels as overrides."""
  sizes, num_classes = infer_sizes(sd)
  variant = released_variant(sizes)
  if variant is not None:
    if base is not None and base.lower() != variant:
      raise ConversionError(f"--variant={base} disagrees with the checkpoint's shapes, which are "
                            f"variant {variant!r}")
    return variant, {}, num_classes
  base = (base or CUSTOM_BASE).lower()
  if base not in VARIANTS:
    raise ConversionError(f"unknown variant {base!r}; expected one of {sorted(VARIANTS)}")
  return base, sizes, num_classes


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
  flat_target = traverse_util.flatten_dict(
      {c: target[c] for c in MAPPED_COLLECTIONS if c in target})
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
  return traverse_util.unflatten_dict(out), ignored




# ---- flax -> torch: the same tables, inverted (convert/to_torch.py) ----

# Forward rules that alias another source format onto mmseg 1.x names: not inverted (we write 1.x).
IMPORT_ONLY_RULES = (r"\.mlp\.dwconv\.dwconv$",)
# Every transform of LEAF_RULES and its inverse.
INVERSE_TRANSFORMS: dict[Callable, Callable] = {
    _oihw_to_hwio: lambda t: np.ascontiguousarray(t.transpose(3, 2, 0, 1)), _same: _same}
# torch BN buffer that no flax variable holds: written as 0 (only BN with momentum=None reads it,
# which SegNeXt never uses), so torch's strict loading finds every key it expects.
NUM_BATCHES_TRACKED = "num_batches_tracked"
_GROUP = re.compile(r"\(([^()]*)\)")


def invert_rule(pattern: str, repl: str) -> tuple[str, str]:
  """The inverse rewrite of a MODULE_RULES entry made of escaped literals, anchors and groups:
  repl's backrefs become the pattern's groups, the pattern's groups become backrefs."""
  body = pattern.removeprefix("^").removesuffix("$")
  literals = _GROUP.split(body)[::2]
  if any(re.search(r"(?<!\\)[][().*+?{}|^$]", lit) for lit in literals):
    raise ValueError(f"MODULE_RULES entry {pattern!r} is not invertible (only literals and groups)")
  groups = _GROUP.findall(body)
  pieces = re.split(r"\\(\d)", repl)                                    # [lit, k, lit, k, ...]
  inv_pattern = "".join(re.escape(p) if i % 2 == 0 else f"({groups[int(p) - 1]})"
                        for i, p in enumerate(pieces))
  unescape = lambda s: re.sub(r"\\(.)", r"\1", s)
  inv_repl = "".join(unescape(lit) + (f"\\{i + 1}" if i < len(groups) else "")
                     for i, lit in enumerate(literals))
  anchors = ("^" if pattern.startswith("^") else "", "$" if pattern.endswith("$") else "")
  return anchors[0] + inv_pattern + anchors[1], inv_repl


def inverse_module_rules() -> list[tuple[str, str]]:
  """MODULE_RULES inverted, in reverse order (flax module path -> mmseg 1.x module path)."""
  return [invert_rule(p, r) for p, r in reversed(MODULE_RULES) if p not in IMPORT_ONLY_RULES]


def _inverse_leaves() -> dict[tuple[str, str, str], tuple[str, Callable]]:
  """(collection, flax leaf, module kind) -> (torch leaf, inverse transform), from LEAF_RULES."""
  return {(coll, flax_leaf, kind): (torch_leaf, INVERSE_TRANSFORMS[fn])
          for torch_leaf, kinds in LEAF_RULES.items()
          for kind, (coll, flax_leaf, fn) in kinds.items()}


def torch_key(path: tuple, flat: Mapping[tuple, Any]) -> tuple[str, Callable]:
  """flax path (incl. collection) -> (mmseg 1.x key, inverse transform); `flat` gives the kind."""
  collection, *module, leaf = path
  if leaf in PARAM_LEAVES:
    module, leaf = module + [leaf], ""
  name = ".".join(module)
  for pattern, repl in inverse_module_rules():
    name = re.sub(pattern, repl, name)
  if not leaf:
    return name, _same
  kind = "conv" if ("params", *module, "kernel") in flat else "norm"
  rule = _inverse_leaves().get((collection, leaf, kind))
  if rule is None:
    raise ConversionError(f"no LEAF_RULES entry yields {'/'.join(path)}")
  return f"{name}.{rule[0]}", rule[1]


def export_state_dict(variables: Mapping[str, Any],
                      backbone_only: bool = False) -> dict[str, np.ndarray]:
  """flax variables -> mmseg 1.x state_dict (numpy), through the inverted tables; every key is
  checked to map back to its flax path with `map_key`. backbone_only: bare MSCAN keys."""
  flat = traverse_util.flatten_dict({c: variables[c] for c in MAPPED_COLLECTIONS if c in variables})
  sd, bad = {}, []
  for path, value in flat.items():
    key, fn = torch_key(path, flat)
    back = map_key(key, flat)
    if back is None or back[0] != path or INVERSE_TRANSFORMS[back[1]] is not fn:
      bad.append(f"{'/'.join(path)} -> {key}")
    sd[key] = fn(np.asarray(value))
    if key.endswith(".running_mean"):
      sd[key.removesuffix("running_mean") + NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
  if bad:
    raise ConversionError(f"{len(bad)} keys do not invert: {', '.join(bad[:8])}")
  if backbone_only:
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
  return dict(sorted(sd.items()))
