"""Pretrained weights for training: the same conversion as the converter, then one explicit merge.

`load_pretrained(path, variables, variant)` accepts an ImageNet MSCAN .pth (mmseg or official), a
segmentor .pth, a converted / train.py checkpoint directory, or a released model's name (zoo.py:
its .pth, downloaded once), and overlays it on freshly initialised `variables`. What was not
loaded is named, never silent.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util

from segnext_jax.convert_map import SIZE_KEYS, describe_size
from segnext_jax.errors import InputError

# Paths that may differ in shape between source and model (a new class count): re-initialised.
REINIT_ON_SHAPE_CHANGE = (("params", "decode_head", "conv_seg"),)


@dataclasses.dataclass
class MergeReport:
  loaded: list[str]
  reinitialised: list[str]   # present in the source with another shape (the classifier)
  not_in_source: list[str]   # kept at their initial value (e.g. the head of a backbone-only file)
  unused: list[str]          # in the source but not in the model

  def summary(self, n: int = 4) -> str:
    short = lambda xs: (", ".join(sorted({"/".join(x.split("/")[:4]) for x in xs})[:n])
                        + (" ..." if len(xs) > n else "")) if xs else "none"
    return (f"loaded {len(self.loaded)} tensors; re-initialised {len(self.reinitialised)} "
            f"({short(self.reinitialised)}); not in the source {len(self.not_in_source)} "
            f"({short(self.not_in_source)}); unused {len(self.unused)} ({short(self.unused)})")


def merge(init: dict, source: dict) -> tuple[dict, MergeReport]:
  """`init` with every leaf of `source` of equal path and shape; shape changes are an error
  except under REINIT_ON_SHAPE_CHANGE (big_vision's merge_params, with a report)."""
  flat_init = traverse_util.flatten_dict(init)
  flat_src = traverse_util.flatten_dict(source)
  out, report = dict(flat_init), MergeReport([], [], [], [])
  for path, value in flat_init.items():
    name = "/".join(path)
    if path not in flat_src:
      report.not_in_source.append(name)
    elif tuple(flat_src[path].shape) == tuple(value.shape):
      out[path] = jnp.asarray(flat_src[path], value.dtype)
      report.loaded.append(name)
    elif any(path[:len(p)] == p for p in REINIT_ON_SHAPE_CHANGE):
      report.reinitialised.append(f"{name} {tuple(flat_src[path].shape)}->{tuple(value.shape)}")
    else:
      raise InputError(f"pretrained {name} has shape {tuple(flat_src[path].shape)}, the model "
                       f"{tuple(value.shape)}")
  report.unused = ["/".join(p) for p in flat_src if p not in flat_init]
  return traverse_util.unflatten_dict(out), report


def read_source(path: str | Path) -> tuple[dict, str, dict]:
  """(variables, variant, custom size) of a .pth (converted on the fly), a checkpoint directory or
  a release's name; the custom size is the source's embed_dims / depths / head_channels
  overrides ({} if none)."""
  from segnext_jax import zoo
  path = zoo.local(path)
  if path.is_dir():
    from segnext_jax import checkpoint
    _, variables, meta = checkpoint.load(path, backbone_only_ok=True)
  else:
    from segnext_jax import torch_io
    variables, meta, _ = torch_io.convert_file(path)
  sizes = {k: v for k, v in meta.get("model", {}).items() if k in SIZE_KEYS}
  return variables, meta["variant"], sizes


def load_pretrained(path: str, variables: dict, variant: str) -> tuple[dict, MergeReport]:
  """Overlay pretrained weights on `variables`; the source must be the same variant (and, for a
  custom size, the model built with the same sizes: the refusal says which)."""
  source, src_variant, sizes = read_source(path)
  if src_variant != variant:
    raise InputError(f"--pretrained {path} is variant {src_variant!r}, the model is {variant!r}")
  try:
    return merge(jax.tree.map(jnp.asarray, variables), source)
  except ValueError as e:
    if not sizes:
      raise
    raise InputError(f"{e}: --pretrained {path} is a custom size ({describe_size(sizes)}); give "
                     "the model the same with --model-overrides") from None
