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
  """Load a converted checkpoint or a train.py workdir (its latest step):
  returns (model, {'params', 'batch_stats'})."""
  if (Path(ckpt_dir) / "checkpoints").is_dir() and not (Path(ckpt_dir) / META_FILE).exists():
    return load_training_checkpoint(ckpt_dir, **overrides)
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


def load_training_checkpoint(workdir: str | os.PathLike, step: int | None = None,
                             **overrides: Any) -> tuple[SegNeXt, dict]:
  """(model, variables) from a train.py workdir: only the 'model' and 'meta' items are read."""
  mngr = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", item_names=("model", "opt", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoints yet")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  model = build_model(meta, **overrides)
  target = abstract_variables(model)
  got = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  mngr.close()
  return model, dict(got.model)


def any_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a converted checkpoint or of a train.py workdir's latest step."""
  path = Path(ckpt_dir) / META_FILE
  if path.is_file():
    return json.loads(path.read_text())
  mngr = ocp.CheckpointManager(Path(ckpt_dir).absolute() / "checkpoints", item_names=("model", "opt", "meta"))
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"{ckpt_dir}: neither a converted checkpoint nor a train.py workdir")
  meta = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  mngr.close()
  return dict(meta)


def class_names(ckpt_dir: str | os.PathLike) -> list[str] | None:
  """Class names stored with a checkpoint (training runs store them; converted ADE20K: None)."""
  return any_meta(ckpt_dir).get("class_names")


def train_config(ckpt_dir: str | os.PathLike) -> dict | None:
  """The TrainConfig (as a dict) of a train.py workdir; None for converted checkpoints."""
  return any_meta(ckpt_dir).get("config")
