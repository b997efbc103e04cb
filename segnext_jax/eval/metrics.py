"""Segmentation metrics as mmseg 1.x's IoUMetric computes them: one confusion matrix summed over the
whole set, then per-class IoU / Acc, mIoU, mAcc and aAcc (`mmseg/evaluation/metrics/iou_metric.py`).
"""
from __future__ import annotations

import numpy as np

from segnext_jax.data import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """(K, K) int64 counts [label, pred] over the non-ignored pixels."""
  valid = label != ignore_index
  idx = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict:
  """IoU/Acc per class from set-wide sums; classes absent from both prediction and label are NaN
  and left out of the means; aAcc over all non-ignored pixels."""
  cm = cm.astype(np.float64)
  inter = np.diag(cm)
  label_area, pred_area = cm.sum(1), cm.sum(0)
  union = label_area + pred_area - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
    acc = inter / label_area
  return {"aAcc": float(inter.sum() / max(cm.sum(), 1)), "mIoU": float(np.nanmean(iou)),
          "mAcc": float(np.nanmean(acc)), "IoU": iou, "Acc": acc}
