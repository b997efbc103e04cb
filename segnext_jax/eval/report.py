"""An evaluation's metrics as eval.py reports them: a per-class markdown table with the summary
line, and the --out JSON (values in percent, as a training run's metrics.jsonl)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def percent(x: float) -> float | None:
  """A metric in percent, rounded to 4 decimals; None (JSON null) for NaN (a class absent)."""
  return None if not np.isfinite(x) else round(float(x) * 100, 4)


# The --out JSON's top-level fields before "settings", in order: name -> value of
# (evaluate()'s results, class names). A new field is a new row.
JSON_FIELDS: dict[str, Callable[[dict, Sequence[str]], Any]] = {
    "aAcc": lambda res, names: percent(res["aAcc"]),
    "mIoU": lambda res, names: percent(res["mIoU"]),
    "mAcc": lambda res, names: percent(res["mAcc"]),
    "per_class": lambda res, names: {n: {"IoU": percent(i), "Acc": percent(a)}
                                     for n, i, a in zip(names, res["IoU"], res["Acc"])},
    "IoU": lambda res, names: [percent(i) for i in res["IoU"]],  # in class order
    "confusion": lambda res, names: np.asarray(res["confusion"]).tolist(),  # [label][prediction]
    "images": lambda res, names: res["images"],
    "images_per_s": lambda res, names: res["images_per_s"],
    "devices": lambda res, names: res["devices"],
    "processes": lambda res, names: res["processes"],
}


def format_table(res: dict, names: Sequence[str]) -> str:
  """Per-class IoU and Acc as a markdown table, then aAcc, mIoU, mAcc and the throughput."""
  rows = ["| class | IoU | Acc |", "|---|---|---|"]
  for name, iou, acc in zip(names, res["IoU"], res["Acc"]):
    rows.append(f"| {name} | {100 * iou:.2f} | {100 * acc:.2f} |")
  rows.append(f"\naAcc {100 * res['aAcc']:.2f}  mIoU {100 * res['mIoU']:.2f}  mAcc {100 * res['mAcc']:.2f}"
              f"  ({res['images']} images, {res['images_per_s']:.2f} img/s on {res['devices']} "
              f"device(s), {res['processes']} process(es))")
  return "\n".join(rows)


def to_json(res: dict, names: Sequence[str], settings: dict) -> dict:
  """The --out document: JSON_FIELDS of the results, then the run's `settings`."""
  return {**{key: field(res, names) for key, field in JSON_FIELDS.items()}, "settings": settings}
