"""Model checkpoints on disk: an orbax tree of `{'params', 'batch_stats'}` plus `segnext.json`.

Written by the converter (and exported by training); `load_checkpoint(dir)` rebuilds the model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from segnext_jax.model import SegNeXt, abstract_variables, segnext

META_FILE = "segnext.json"
TREE_DIR = "variables"


def save_model_checkpoint(out_dir: str | os.PathLike, variables: dict, meta: dict[str, Any],
                          overwrite: bool = False) -> Path:
  """Atomically write `variables` and `meta` (must hold 'variant'; model kwargs under 'model')."""
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists (pass overwrite / --force to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    tree = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / TREE_DIR, tree)
      ckptr.wait_until_finished()
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
      shutil.rmtree(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  path = Path(ckpt_dir) / META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{ckpt_dir}: not a segnext-jax checkpoint (no {META_FILE})")
  return json.loads(path.read_text())


def build_model(meta: dict[str, Any], **overrides: Any) -> SegNeXt:
  """The model a checkpoint's metadata describes; overrides (e.g. dtype, dw_impl) win."""
  return segnext(meta["variant"], **{**meta.get("model", {}), **overrides})


def load_checkpoint(ckpt_dir: str | os.PathLike, **overrides: Any) -> tuple[SegNeXt, dict]:
  """Load a converted (or exported) checkpoint: returns (model, {'params', 'batch_stats'})."""
  meta = read_meta(ckpt_dir)
  if meta.get("backbone_only"):
    raise ValueError(f"{ckpt_dir} holds only an MSCAN backbone; use it as train.py --pretrained")
  model = build_model(meta, **overrides)
  target = abstract_variables(model)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(Path(ckpt_dir).absolute() / TREE_DIR, target)
  return model, dict(variables)


def load_tree(ckpt_dir: str | os.PathLike) -> dict:
  """The raw stored variables tree (no model needed), as numpy arrays."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(ckpt_dir).absolute() / TREE_DIR)
