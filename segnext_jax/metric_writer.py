"""Training metrics on disk: WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard
event files in WORKDIR (tensorboardX: a small writer without TensorFlow).

Train lines: step, loss, lr, grad_norm, images_per_s. Eval lines: step, split='val', aAcc, mIoU,
mAcc (percent, as eval.py's JSON) and per-class IoU. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FILE = "metrics.jsonl"


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard; on resume, drops lines past the resumed step."""

  def __init__(self, workdir: str | Path, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / FILE
    if not enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(logdir=str(workdir), purge_step=resume_step or None)

  def _truncate_after(self, step: int) -> None:
    """Lines of steps a resumed run will redo (written after the last checkpoint) are dropped."""
    if not self.path.is_file():
      return
    keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
    self.path.write_text("".join(l + "\n" for l in keep))

  def write(self, step: int, scalars: dict[str, float], prefix: str = "train",
            extra: dict[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": prefix, **{k: _num(v) for k, v in scalars.items()},
              **(extra or {})}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in scalars.items():
      self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def _num(v: Any) -> float | None:
  v = float(v)
  return None if math.isnan(v) or math.isinf(v) else v


def read(workdir: str | Path) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl."""
  path = Path(workdir) / FILE
  return [json.loads(l) for l in path.read_text().splitlines() if l] if path.is_file() else []
