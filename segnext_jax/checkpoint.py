"""The one checkpoint layout: an orbax CheckpointManager directory, for converted and trained models.

  DIR/checkpoints/<step>/model   {'params', 'batch_stats', 'nmf_bases'} (orbax, atomic per step)
  DIR/checkpoints/<step>/meta    JSON: variant, model kwargs, class names/palette, source, config
  DIR/checkpoints/<step>/opt     optimizer state + step (train.py only)

`convert/from_torch.py` writes step 0 of a fresh DIR; `train.py` writes steps of its workdir.
`load(DIR)` reads the latest step of either, restoring onto the devices of THIS process, so a
checkpoint written on 8 devices (or 2 processes) loads on 1 and the other way round.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from segnext_jax.model import SegNeXt, abstract_variables, segnext

ITEMS = ("model", "opt", "meta")
SUBDIR = "checkpoints"


def manager(ckpt_dir: str | os.PathLike, keep: int | None = None,
            create: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of DIR/checkpoints (keep: how many steps to keep, None = all)."""
  return ocp.CheckpointManager(
      Path(ckpt_dir).absolute() / SUBDIR, item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))


def save(mngr: ocp.CheckpointManager, step: int, variables: dict, meta: dict[str, Any],
         opt: Any = None) -> None:
  """Write one step (atomic: orbax writes a temporary directory and renames it)."""
  items = dict(model=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta))
  if opt is not None:
    items["opt"] = ocp.args.StandardSave(opt)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def save_converted(out_dir: str | os.PathLike, variables: dict, meta: dict[str, Any],
                   overwrite: bool = False) -> Path:
  """A converted model as step 0 of a new checkpoint directory."""
  out = Path(out_dir).absolute()
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} already exists (pass overwrite / --force to replace it)")
    shutil.rmtree(out)
  with manager(out, create=True) as mngr:
    save(mngr, 0, variables, meta)
    mngr.wait_until_finished()
  return out


def latest_step(mngr: ocp.CheckpointManager, ckpt_dir) -> int:
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir}: not a segnext-jax checkpoint (no {SUBDIR}/<step>; "
                            "convert a .pth with convert/from_torch.py or train with train.py)")
  return step


def read_meta(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The metadata of DIR's latest (or given) step."""
  if not (Path(ckpt_dir) / SUBDIR).is_dir():
    raise FileNotFoundError(f"{ckpt_dir}: not a segnext-jax checkpoint (no {SUBDIR}/)")
  with manager(ckpt_dir) as mngr:
    step = latest_step(mngr, ckpt_dir) if step is None else step
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def build_model(meta: dict[str, Any], **overrides: Any) -> SegNeXt:
  """The model a checkpoint's metadata describes; overrides (e.g. dtype, dw_impl) win."""
  return segnext(meta["variant"], **{**meta.get("model", {}), **overrides})


def on_devices(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Abstract arrays placed on this process's devices (default: the first local device): the
  restore target that makes a checkpoint independent of the topology that wrote it."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(mngr: ocp.CheckpointManager, step: int, **targets: Any) -> dict[str, Any]:
  """Restore the named items (e.g. model=abstract tree, opt=abstract tree) of one step."""
  got = mngr.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(t) for name, t in targets.items()}))
  return {name: got[name] for name in targets}


def load(ckpt_dir: str | os.PathLike, step: int | None = None, *, backbone_only_ok: bool = False,
         **overrides: Any) -> tuple[SegNeXt, dict, dict[str, Any]]:
  """(model, variables, meta) of a converted checkpoint or a train.py workdir (latest step)."""
  meta = read_meta(ckpt_dir, step)
  if meta.get("backbone_only") and not backbone_only_ok:
    raise ValueError(f"{ckpt_dir} holds only an MSCAN backbone; use it as train.py --pretrained")
  model = build_model(meta, **overrides)
  target = abstract_variables(model)
  if meta.get("backbone_only"):
    flat = traverse_util.flatten_dict(target)
    target = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[1] == "backbone"})
  with manager(ckpt_dir) as mngr:
    variables = restore(mngr, latest_step(mngr, ckpt_dir) if step is None else step,
                        model=on_devices(target))["model"]
  return model, dict(variables), meta


def load_checkpoint(ckpt_dir: str | os.PathLike, **overrides: Any) -> tuple[SegNeXt, dict]:
  """(model, {'params', 'batch_stats', 'nmf_bases'}) of a converted checkpoint or a train.py
  workdir; `model.apply(variables, images, train=False)` uses the stored fixed NMF bases."""
  model, variables, _ = load(ckpt_dir, **overrides)
  return model, variables
