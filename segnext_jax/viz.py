"""Pictures of a class map: the colours and names of the classes, a colour mask, and the image
blended with it beside a legend of the classes present (what predict.py writes). RGB uint8."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from segnext_jax.data.ade20k_classes import ADE20K_CLASSES, ADE20K_PALETTE
from segnext_jax.data.folder import default_palette


def palette(meta: dict, num_classes: int) -> np.ndarray:
  """(K, 3) colours: the checkpoint's palette, ADE20K's for 150 classes, else a fixed
  pseudo-random one."""
  if meta.get("palette") and len(meta["palette"]) == num_classes:
    return np.array(meta["palette"], np.uint8)
  if num_classes == len(ADE20K_PALETTE):
    return np.array(ADE20K_PALETTE, np.uint8)
  return np.array(default_palette(num_classes), np.uint8)


def class_names(meta: dict, num_classes: int) -> list[str]:
  """The checkpoint's class names, ADE20K's for 150 classes, else the class indices."""
  if meta.get("class_names") and len(meta["class_names"]) == num_classes:
    return list(meta["class_names"])
  return list(ADE20K_CLASSES) if num_classes == len(ADE20K_CLASSES) else [str(i) for i in range(num_classes)]


def colorize(pred: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """(H, W) class map -> (H, W, 3) colour mask."""
  return colors[pred]


def overlay(img: np.ndarray, colored: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """The image blended with a colour mask (uint8, the image's size)."""
  return (img.astype(np.float32) * (1 - alpha) + colored.astype(np.float32) * alpha).astype(np.uint8)


def overlay_with_legend(img: np.ndarray, pred: np.ndarray, colors: np.ndarray,
                        names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
  """The image blended with the colour mask, plus a legend panel of the classes present (the
  most frequent first)."""
  blend = overlay(img, colorize(pred, colors), alpha)
  present, counts = np.unique(pred, return_counts=True)
  order = present[np.argsort(-counts)]
  row = max(18, img.shape[0] // 30)
  panel = np.full((max(img.shape[0], row * (len(order) + 1)), 220, 3), 255, np.uint8)
  for i, c in enumerate(order):
    y = row // 2 + i * row
    cv2.rectangle(panel, (8, y), (8 + row - 4, y + row - 4), tuple(int(v) for v in colors[c]), -1)
    cv2.putText(panel, str(names[c])[:24], (row + 10, y + row - 7), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (0, 0, 0), 1, cv2.LINE_AA)
  canvas = np.full((panel.shape[0], img.shape[1] + panel.shape[1], 3), 255, np.uint8)
  canvas[:img.shape[0], :img.shape[1]] = blend
  canvas[:, img.shape[1]:] = panel
  return canvas
