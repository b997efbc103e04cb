"""A train.py workdir's checkpoints: each step's save checked against the free disk, the newest
readable step restored on resume, and the recipe a resume must match (layout: checkpoint.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from segnext_jax import checkpoint, faults
from segnext_jax.config import TrainConfig, recipe_diff
from segnext_jax.errors import InputError

log = logging.getLogger("segnext_jax.train")

ORBAX_META_BYTES = 2**20  # what orbax writes beside the arrays of one step, at most


class RecipeMismatch(InputError):
  """Resuming a workdir with another recipe than the one it was trained with."""


def check_resumable(workdir: Path, cfg: TrainConfig) -> None:
  """A workdir with a complete checkpoint resumes only with the recipe it was started with
  (one without: nothing was trained, any recipe may start there)."""
  saved = workdir / "config.json"
  if not saved.is_file() or not checkpoint.complete_steps(workdir, checkpoint.ITEMS):
    return
  diff = recipe_diff(json.loads(saved.read_text()), cfg)
  if diff:
    raise RecipeMismatch(f"{workdir} was trained with another recipe ({'; '.join(diff)}); use a new "
                         "--workdir, or --config " + str(saved) + " to resume it")


def tree_nbytes(tree: Any) -> int:
  """Bytes of a checkpoint holding `tree`'s arrays (+ orbax's metadata)."""
  return sum(x.nbytes for x in jax.tree.leaves(tree)) + ORBAX_META_BYTES


def saved_steps(workdir: Path, lead: bool) -> list[int]:
  """The run's complete steps (the one answer to "is this a resume?"), once the lead process has
  removed what an interrupted save left unfinished."""
  if lead:
    checkpoint.clean_unfinished(workdir, checkpoint.ITEMS)
  return checkpoint.complete_steps(workdir, checkpoint.ITEMS)


class RunCheckpoints:
  """WORKDIR/checkpoints of one run: `restore_latest` on resume, `save` every --ckpt-every steps
  (refused with DiskFull before writing when the last step's size does not fit), `saved`: the
  last step on disk, for the messages of faults that stop the run."""

  def __init__(self, workdir: Path, keep: int):
    self.mngr = checkpoint.manager(workdir, keep, create=True, async_save=False)
    self.workdir, self.dir, self.keep = workdir, Path(self.mngr.directory), keep
    self.saved: int | None = None  # set on resume, and by each save
    self.needed = 0  # bytes one more step takes: set by check_space, grown by each save

  def restore_latest(self, state, steps: list[int], mesh: jax.sharding.Mesh):
    """The newest step that restores. A newer one that does not is renamed <step>.unreadable with
    a warning naming it, but only once an older step restored: that proves the model and the
    reader fit, so the newer step is damaged (a model that no longer fits any step stops with
    the newest step's error, setting nothing aside). In a multi-process run: stop, never rename."""
    bad: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        restored = restore_state(self.mngr, state, step, mesh)
      except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
        bad.append((step, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]))
        if jax.process_count() > 1:
          break
        continue
      for s, why in bad:
        kept = checkpoint.set_aside(self.dir.parent, s)
        log.warning("%s/%d cannot be read (%s); resuming from step %d instead; the damaged step is "
                    "kept as %s", self.dir, s, why, step, kept.name)
      if bad:
        self.mngr.reload()
      return restored
    step, why = bad[0]
    raise checkpoint.CheckpointError(
        f"{self.dir}/{step}: cannot be read ({why})" + (
            "; no older step could be read either" if len(bad) > 1 else "") +
        "; move the damaged step aside (or use a new --workdir) to go on")

  def check_space(self, state, steps_left: int, every: int, best: int = 0) -> None:
    """Before the first step: refuse when not even one checkpoint fits, warn when the ones the
    run will keep (one every `every` of `steps_left` steps, at most `keep`; and its best
    checkpoint, `best` bytes) do not."""
    saves = min(self.keep, -(-steps_left // every))
    self.needed = tree_nbytes((state.variables(), state.opt_state))
    if self.saved is not None:
      self.needed = max(self.needed, faults.tree_bytes(self.dir / str(self.saved)))
    check_space(self.workdir, self.needed, saves, best)

  def save(self, state, meta: dict) -> None:
    """Save the state's step as write_checked does (DiskFull naming the saved steps that are intact)."""
    step = int(state.step)
    saved = checkpoint.complete_steps(self.dir.parent, checkpoint.ITEMS)
    intact = f"saved steps {', '.join(map(str, saved))} are intact" if saved else "no step saved yet"
    write = lambda: checkpoint.save(self.mngr, step, state.variables(), meta,
                                    opt={"opt_state": state.opt_state, "step": state.step})
    write_checked(self.dir, f"the checkpoint of step {step}", self.needed, intact, write,
                  settle=self._settle)
    self.needed = max(self.needed, faults.tree_bytes(self.dir / str(step)))
    self.saved = step

  def _settle(self) -> None:
    with contextlib.suppress(Exception), faults.quiet_logs("absl", "asyncio"):
      self.mngr.wait_until_finished()  # orbax's writer threads, before removing what they wrote

  def close(self, lead: bool) -> None:
    """Wait for the writers and close; the lead removes a failed save's leftovers."""
    self._settle()
    with contextlib.suppress(Exception), faults.quiet_logs("absl", "asyncio"):
      self.mngr.close()
    if lead:
      remove_unfinished(self.dir)


def restore_state(mngr, state, step: int, mesh: jax.sharding.Mesh):
  """Restore onto THIS run's mesh (replicated), whatever device count wrote the checkpoint."""
  repl = NamedSharding(mesh, P())
  target = lambda t: checkpoint.on_devices(jax.eval_shape(lambda: t), repl)
  got = checkpoint.restore(mngr, step, model=target(state.variables()),
                           opt=target({"opt_state": state.opt_state, "step": state.step}))
  m, o = got["model"], got["opt"]
  return state.replace(params=m["params"], batch_stats=m["batch_stats"], nmf_bases=m["nmf_bases"],
                       opt_state=o["opt_state"], step=o["step"])


def write_checked(ckpt_dir: Path, what: str, needed: int, intact: str, write: Callable[[], None],
                  settle: Callable[[], None] = lambda: None) -> None:
  """write() into ckpt_dir if the disk has room for `needed` bytes (DiskFull before writing
  anything otherwise); a write that still fails for space is DiskFull too: settle() (writer
  threads), then its unfinished entries are removed. The one line names `what` and `intact`."""
  full = lambda free: faults.DiskFull(
      f"{ckpt_dir}: no space for {what} (needs ~{faults.mb(needed)}, {faults.mb(free)} free); "
      f"{intact}; free space and re-run the same command to resume")
  free = faults.free_bytes(ckpt_dir)
  if free < needed:
    raise full(free)
  try:
    with faults.quiet_logs("absl", "asyncio"):
      write()
  except Exception as e:
    if not faults.is_disk_full(e):
      raise
    settle()
    remove_unfinished(ckpt_dir)
    raise full(faults.free_bytes(ckpt_dir)) from None


def remove_unfinished(ckpt_dir: Path) -> None:
  """Remove the entries of saves that did not finish (the caller holds the workdir lock)."""
  for tmp in ckpt_dir.glob(f"*{checkpoint.TMP_MARK}*"):
    shutil.rmtree(tmp, ignore_errors=True)


def check_space(workdir: Path, needed: int, saves: int, best: int = 0) -> None:
  """Refuse (DiskFull) when not even one checkpoint of `needed` bytes fits in workdir; warn when
  the `saves` checkpoints a run keeps (and its best checkpoint, `best` bytes) do not."""
  free = faults.free_bytes(workdir)
  if free < needed:
    raise faults.DiskFull(f"{workdir}: {faults.mb(free)} free, but one checkpoint needs "
                          f"~{faults.mb(needed)}; free space or use another --workdir")
  total = needed * saves + best
  if free < total:
    log.warning("%s: %s free; the %d checkpoints this run keeps%s need ~%s (each ~%s)", workdir,
                faults.mb(free), saves, " and its best" if best else "", faults.mb(total),
                faults.mb(needed))
