"""The one checkpoint layout: an orbax CheckpointManager directory, for converted and trained models.

  DIR/checkpoints/<step>/model   {'params', 'batch_stats', 'nmf_bases'} (orbax, atomic per step)
  DIR/checkpoints/<step>/meta    JSON: variant, model kwargs, class names/palette, source, config
  DIR/checkpoints/<step>/opt     optimizer state + step (train.py only)

`convert/from_torch.py` writes step 0 of a fresh DIR; `train.py` writes steps of its workdir.
`load(DIR)` reads the latest step of either, restoring onto the devices of THIS process, so a
checkpoint written on 8 devices (or 2 processes) loads on 1 and the other way round; `locate`
resolves a path and reads its metadata once (cheap), `load_located` then restores that step.

A *complete* step is a step directory holding every item it needs; an interrupted save leaves
`<step>.orbax-checkpoint-tmp*` (never a step), a damaged step found on resume is renamed
`<step>.unreadable` (kept for inspection, never a step again). `complete_steps` is the one answer
to "which steps are there?" (and so to "is this a resume?").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from segnext_jax.errors import InputError
from segnext_jax.model import SegNeXt, abstract_variables, segnext

ITEMS = ("model", "opt", "meta")
SUBDIR = "checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"
UNREADABLE = ".unreadable"

log = logging.getLogger("segnext_jax.checkpoint")


class CheckpointError(InputError):
  """A path that is not a usable checkpoint, or a step that cannot be read; one line."""


def manager(ckpt_dir: str | os.PathLike, keep: int | None = None, create: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  """The orbax manager of DIR/checkpoints (keep: how many steps to keep, None = all).
  async_save=False: `save` returns once the step is on disk and raises its own failure there."""
  return ocp.CheckpointManager(
      Path(ckpt_dir).absolute() / SUBDIR, item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=async_save))


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
  try:
    with manager(out, create=True) as mngr:
      save(mngr, 0, variables, meta)
      mngr.wait_until_finished()
  except BaseException:  # a failed or interrupted write leaves nothing half-written
    shutil.rmtree(out, ignore_errors=True)
    raise
  return out


# ---------------------------------------------------------------------------------------------
# Which steps a directory holds

def _step_names(ckpt_dir: str | os.PathLike) -> list[Path]:
  sub = Path(ckpt_dir) / SUBDIR
  return sorted(sub.iterdir()) if sub.is_dir() else []


def complete_steps(ckpt_dir: str | os.PathLike, items: tuple[str, ...] = ("model", "meta")) -> list[int]:
  """The steps of DIR/checkpoints whose directory holds every one of `items`, ascending."""
  return sorted(int(p.name) for p in _step_names(ckpt_dir)
                if p.name.isdigit() and p.is_dir() and all((p / i).is_dir() for i in items))


def leftovers(ckpt_dir: str | os.PathLike, items: tuple[str, ...] = ("model", "meta")) -> list[Path]:
  """Entries of DIR/checkpoints that are not complete steps: unfinished saves
  (*.orbax-checkpoint-tmp*), step directories missing an item, anything foreign."""
  done = {str(s) for s in complete_steps(ckpt_dir, items)}
  return [p for p in _step_names(ckpt_dir) if p.name not in done and not p.name.endswith(UNREADABLE)]


def clean_unfinished(ckpt_dir: str | os.PathLike, items: tuple[str, ...]) -> list[Path]:
  """Warn about every leftover entry; remove the unfinished saves and incomplete step directories
  (only a run holding the workdir lock may call this: no other writer exists). Foreign entries
  are left in place."""
  removed = []
  for p in leftovers(ckpt_dir, items):
    ours = TMP_MARK in p.name or re.fullmatch(r"\d+", p.name)
    if ours:
      log.warning("%s: an unfinished checkpoint (an interrupted save); ignored and removed", p)
      shutil.rmtree(p) if p.is_dir() else p.unlink()
      removed.append(p)
    else:
      log.warning("%s: not a checkpoint step; ignored", p)
  return removed


def set_aside(ckpt_dir: str | os.PathLike, step: int) -> Path:
  """Rename an unreadable step to <step>.unreadable (kept, no longer a step)."""
  src = Path(ckpt_dir) / SUBDIR / str(step)
  dst = src.with_name(src.name + UNREADABLE)
  n = 1
  while dst.exists():
    dst, n = src.with_name(f"{src.name}{UNREADABLE}.{n}"), n + 1
  src.rename(dst)
  return dst


def describe_path(path: Path) -> str:
  """What a path that is not a checkpoint directory is, for the one-line refusal."""
  if not path.exists():
    return f"{path}: no such file or directory"
  if path.is_file():
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
      return (f"{path}: a torch checkpoint file, not a segnext-jax checkpoint directory; convert "
              "it first: python convert/from_torch.py " + str(path))
    from segnext_jax.data.files import IMAGE_SUFFIXES
    kind = "an image" if path.suffix.lower() in IMAGE_SUFFIXES else "a file"
    return f"{path}: {kind}, not a segnext-jax checkpoint directory"
  return (f"{path}: not a segnext-jax checkpoint (no {SUBDIR}/<step> inside; convert a .pth with "
          "convert/from_torch.py or train with train.py)")


def resolve(path: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
  """(checkpoint dir, step) for a checkpoint dir, a train.py workdir, or DIR/checkpoints/<step>
  (`step` None: the given or latest complete one). CheckpointError names what is wrong."""
  path = Path(path)
  if path.name.isdigit() and path.parent.name == SUBDIR and path.is_dir():
    if step is not None and step != int(path.name):
      raise CheckpointError(f"{path} is step {path.name}, but --step {step} was given")
    path, step = path.parent.parent, int(path.name)
  elif path.name == SUBDIR and path.is_dir():
    path = path.parent
  steps = complete_steps(path)
  if not steps:
    raise CheckpointError(describe_path(path))
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise CheckpointError(f"{path} has no complete step {step} (steps: "
                          f"{', '.join(map(str, steps))})")
  return path, step


def _unreadable(path: Path, step: int, e: Exception) -> CheckpointError:
  others = [s for s in complete_steps(path) if s != step]
  hint = f"; pick another with --step ({', '.join(map(str, others))})" if others else ""
  return CheckpointError(f"{path / SUBDIR / str(step)}: cannot be read ("
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}){hint}")


@dataclasses.dataclass(frozen=True)
class Located:
  """One complete step of a checkpoint directory and its metadata: what `locate` found and
  `load_located` restores, so a command resolves and reads a checkpoint once."""
  dir: Path
  step: int
  meta: dict[str, Any]


def locate(path: str | os.PathLike, step: int | None = None) -> Located:
  """The checkpoint at `path` (see `resolve`; a released model's name: its conversion in the zoo
  cache, see zoo.py), its metadata read (cheap: no arrays); CheckpointError names a bad path, a
  missing step or an unreadable one."""
  from segnext_jax import zoo
  path, step = resolve(zoo.resolve(path), step)
  with manager(path) as mngr:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many kinds on damaged files
      raise _unreadable(path, step, e) from None
  return Located(path, step, dict(meta))


def read_meta(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The metadata of DIR's latest (or given) step."""
  return locate(ckpt_dir, step).meta


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
  """(model, variables, meta) of a converted checkpoint or a train.py workdir (latest step, or
  `step`; ckpt_dir may also be DIR/checkpoints/<step>)."""
  return load_located(locate(ckpt_dir, step), backbone_only_ok=backbone_only_ok, **overrides)


def load_located(found: Located, *, backbone_only_ok: bool = False,
                 **overrides: Any) -> tuple[SegNeXt, dict, dict[str, Any]]:
  """(model, variables, meta) of a located step: its arrays restored onto this process's devices."""
  ckpt_dir, step, meta = found.dir, found.step, found.meta
  if meta.get("backbone_only") and not backbone_only_ok:
    raise InputError(f"{ckpt_dir} holds only an MSCAN backbone; use it as train.py --pretrained")
  model = build_model(meta, **overrides)
  target = abstract_variables(model)
  if meta.get("backbone_only"):
    flat = traverse_util.flatten_dict(target)
    target = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[1] == "backbone"})
  with manager(ckpt_dir) as mngr:
    try:
      variables = restore(mngr, step, model=on_devices(target))["model"]
    except Exception as e:  # orbax raises many kinds on damaged files
      raise _unreadable(Path(ckpt_dir), step, e) from None
  return model, dict(variables), meta


def load_checkpoint(ckpt_dir: str | os.PathLike, **overrides: Any) -> tuple[SegNeXt, dict]:
  """(model, {'params', 'batch_stats', 'nmf_bases'}) of a converted checkpoint, a train.py
  workdir or a released model's name (docs/zoo.md); `model.apply(variables, images,
  train=False)` uses the stored fixed NMF bases."""
  model, variables, _ = load(ckpt_dir, **overrides)
  return model, variables
