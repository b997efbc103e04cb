"""Video in and out (predict.py clip.mp4): frames decoded with OpenCV, each segmented as an image,
written as a mask video and an overlay video at the source's frame rate and size.

Every frame of a clip has one size, so one set of programs (one canvas) serves all its frames,
compiled while the first frame is decoded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from segnext_jax import viz
from segnext_jax.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
# The codec each output container is written with; other inputs (.webm) give .mp4 outputs.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@dataclasses.dataclass(frozen=True)
class Clip:
  """A readable video: its path, frame rate, frame size and (the container's) frame count."""
  path: Path
  fps: float
  size: tuple[int, int]  # (height, width)
  frames: int


def is_video(path: Path) -> bool:
  return path.suffix.lower() in VIDEO_SUFFIXES


def open_clip(path: Path) -> Clip:
  """The clip's properties, its first frame decoded (InputError naming the file otherwise):
  checked before the model loads."""
  cap = cv2.VideoCapture(str(path))
  try:
    ok, frame = cap.read() if cap.isOpened() else (False, None)
    if not ok:
      raise InputError(f"{path}: not a readable video (OpenCV could not decode a frame)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not np.isfinite(fps) or fps <= 0:
      raise InputError(f"{path}: the video has no frame rate")
    return Clip(path, float(fps), frame.shape[:2], int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
  finally:
    cap.release()


def frames(path: Path) -> Iterator[np.ndarray]:
  """Every frame of the video as RGB uint8 (H, W, 3), in order."""
  cap = cv2.VideoCapture(str(path))
  try:
    while True:
      ok, frame = cap.read()
      if not ok:
        return
      yield np.ascontiguousarray(frame[..., ::-1])
  finally:
    cap.release()


def writer(path: Path, clip: Clip) -> cv2.VideoWriter:
  """A writer of frames of the clip's size and rate into `path` (its suffix picks the codec)."""
  h, w = clip.size
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix.lower()]), clip.fps,
                        (w, h))
  if not out.isOpened():
    raise InputError(f"{path}: OpenCV cannot write this video format here")
  return out


def segment(clip: Clip, classes: Callable[[np.ndarray], np.ndarray], out_dir: Path, colors,
            names, on_frame: Callable[[int, np.ndarray], None] | None = None) -> dict:
  """Segment every frame (`classes`: RGB frame -> (H, W) class ids) and write
  out_dir/NAME_mask.<ext> and NAME_overlay.<ext> (NAME.<ext>: the clip's own container, else
  .mp4); on_frame(i, class map) is told of each. Returns {'frames', 'fps', 'mask', 'overlay'}."""
  ext = clip.path.suffix.lower() if clip.path.suffix.lower() in FOURCC else ".mp4"
  paths = {kind: out_dir / f"{clip.path.stem}_{kind}{ext}" for kind in ("mask", "overlay")}
  mask, overlay = writer(paths["mask"], clip), writer(paths["overlay"], clip)
  n = 0
  try:
    for n, frame in enumerate(frames(clip.path), 1):
      pred = classes(frame)
      colored = viz.colorize(pred, colors)
      mask.write(np.ascontiguousarray(colored[..., ::-1]))
      overlay.write(np.ascontiguousarray(viz.overlay(frame, colored)[..., ::-1]))
      if on_frame is not None:
        on_frame(n - 1, pred)
  finally:
    mask.release()
    overlay.release()
  return {"frames": n, "fps": clip.fps, **{k: str(p) for k, p in paths.items()}}
