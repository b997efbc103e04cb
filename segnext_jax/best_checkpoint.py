"""WORKDIR/best: the step of a run with the best validation metric so far (train.py --save-best).

It is a checkpoint directory like a converted model's (best/checkpoints/<step>/{model,meta}), so
eval.py, predict.py, export.py and to_torch read it as they read any checkpoint. Its metadata is
the run's plus `best` ({metric, value, step}), `best_step` and `best_<metric>` (percent, as in
metrics.jsonl). A new best is written beside the old one (orbax: a temporary directory, renamed
when complete) and only then is the old one removed: a kill at any moment leaves a complete best.
A resumed run reads the recorded best back and only a higher value replaces it.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Sequence

import jax

from segnext_jax import checkpoint, run_checkpoint
from segnext_jax.config import TrainConfig, recipe_diff
from segnext_jax.errors import InputError

DIR = "best"
METRICS = ("mIoU", "mAcc", "aAcc")  # and IoU.<class name>
CLASS_PREFIX = "IoU."

log = logging.getLogger("segnext_jax.train")


def check_metric(metric: str, class_names: Sequence[str] | None = None) -> None:
  """ValueError (one line) unless `metric` is one of METRICS or IoU.<a class of the data>."""
  if metric in METRICS:
    return
  if metric.startswith(CLASS_PREFIX):
    if class_names is None or metric[len(CLASS_PREFIX):] in class_names:
      return
    shown = ", ".join(list(class_names)[:8]) + (", ..." if len(class_names) > 8 else "")
    raise InputError(f"--save-best {metric}: the data has no class "
                     f"{metric[len(CLASS_PREFIX):]!r} (classes: {shown})")
  raise InputError(f"--save-best {metric!r}: expected one of {', '.join(METRICS)} or "
                   f"{CLASS_PREFIX}<class name>")


def metric_value(metric: str, percents: dict, iou: dict[str, float | None]) -> float:
  """The metric in percent from one validation (NaN where a class never appeared)."""
  if metric.startswith(CLASS_PREFIX):
    v = iou.get(metric[len(CLASS_PREFIX):])
    return math.nan if v is None else float(v)
  return float(percents[metric])


class BestCheckpoint:
  """The best step of one workdir for one metric: `beats` says whether a step is a new best,
  `save` keeps it."""

  def __init__(self, workdir: Path, metric: str, cfg: TrainConfig, resumed: bool, lead: bool):
    self.dir = Path(workdir) / DIR
    self.metric, self.lead = metric, lead
    self.value: float | None = None
    self.step: int | None = None
    self._check_metric()  # every process: each stops with the one line, none waits for the lead
    _barrier("segnext best checkpoint checked")
    if lead:
      self._recover(cfg, resumed)
    _barrier("segnext best checkpoint recovered")
    steps = checkpoint.complete_steps(self.dir)
    if steps:
      best = checkpoint.read_meta(self.dir, steps[-1])["best"]
      self.value, self.step = float(best["value"]), int(best["step"])

  def _check_metric(self) -> None:
    """Refuse (one line) a best/ kept for another metric; reads only."""
    for s in checkpoint.complete_steps(self.dir):
      kept = checkpoint.read_meta(self.dir, s)["best"]
      if kept["metric"] != self.metric:
        raise InputError(f"{self.dir} keeps the best {kept['metric']} (step {kept['step']}); "
                         f"--save-best {self.metric} would replace it: move it aside or use "
                         f"--save-best {kept['metric']}")

  def _recover(self, cfg: TrainConfig, resumed: bool) -> None:
    """Keep one complete best step (a kill between a save and the old step's removal leaves two;
    an unfinished save leaves a temporary directory); set aside the best of a different recipe
    when a run starts afresh in this workdir."""
    if not self.dir.exists():
      return
    checkpoint.clean_unfinished(self.dir, ("model", "meta"))
    steps = checkpoint.complete_steps(self.dir)
    if not steps:
      return
    metas = {s: checkpoint.read_meta(self.dir, s) for s in steps}
    top = max(steps, key=lambda s: metas[s]["best"]["value"])  # a save is only ever a higher value
    diff = [] if resumed else recipe_diff(metas[top].get("config", {}), cfg)
    if diff:
      aside = _free_name(self.dir.with_name(f"{DIR}.previous"))
      self.dir.rename(aside)
      log.warning("%s is the best of another recipe (%s); kept as %s", self.dir, "; ".join(diff),
                  aside.name)
      return
    self._keep_only(top)

  def beats(self, step: int, value: float) -> bool:
    """Whether `step`'s value is a new best: higher than the recorded one (NaN never is; a step
    that is already the best, redone after a resume, stays as it was)."""
    if math.isnan(value) or step == self.step:
      return False
    return self.value is None or value > self.value

  def save(self, step: int, value: float, variables: dict, meta: dict) -> None:
    """Write `step` as the best (every process: orbax saves together), then remove the old one;
    DiskFull (one line naming the best that is intact) when it does not fit."""
    intact = (f"the best so far (step {self.step}) is intact" if self.step is not None else
              "no best step saved yet")
    run_checkpoint.write_checked(
        self.dir / checkpoint.SUBDIR, f"the best checkpoint of step {step}",
        run_checkpoint.tree_nbytes(variables), intact,
        lambda: self._write(step, value, variables, meta))

  def _write(self, step: int, value: float, variables: dict, meta: dict) -> None:
    best = {"metric": self.metric, "value": value, "step": step}
    meta = {**meta, "best": best, "best_step": step, f"best_{self.metric}": value}
    with checkpoint.manager(self.dir, create=True, async_save=False) as mngr:
      checkpoint.save(mngr, step, variables, meta)
    if self.lead:
      self._keep_only(step)
    self.value, self.step = value, step

  def _keep_only(self, step: int) -> None:
    for s in checkpoint.complete_steps(self.dir):
      if s != step:
        shutil.rmtree(self.dir / checkpoint.SUBDIR / str(s))


def _barrier(name: str) -> None:
  """All processes of a multi-process run meet here (nothing to do in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _free_name(path: Path) -> Path:
  n, out = 1, path
  while out.exists():
    out, n = path.with_name(f"{path.name}.{n}"), n + 1
  return out
