"""Predict segmentation maps and write pictures: raw class-index PNG, colour mask, overlay + legend.

  python predict.py converted/segnext_t photo.jpg more/ -o out/ [--tta] [--nmf-seed 0]
For each input image NAME this writes out/NAME_classes.png (uint8 class ids; 255 if > 255 classes
is impossible here), out/NAME_mask.png (ADE20K palette) and out/NAME_overlay.png (image blended
with the mask, and a legend of the classes present).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def palette(num_classes: int) -> np.ndarray:
  """ADE20K's palette for 150 classes, else a fixed, well-spread pseudo-random one (RGB uint8)."""
  from segnext_jax.data.ade20k_classes import ADE20K_PALETTE
  if num_classes == len(ADE20K_PALETTE):
    return np.array(ADE20K_PALETTE, np.uint8)
  rng = np.random.default_rng(12345)
  return rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)


def overlay_with_legend(img: np.ndarray, pred: np.ndarray, colors: np.ndarray, names,
                        alpha: float = 0.5) -> np.ndarray:
  """RGB image blended with the colour mask, plus a legend panel of the classes present."""
  blend = (img.astype(np.float32) * (1 - alpha) + colors[pred].astype(np.float32) * alpha).astype(np.uint8)
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


def collect_images(inputs: list[str]) -> list[Path]:
  files = []
  for item in map(Path, inputs):
    if item.is_dir():
      files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
      files.append(item)
  return files


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  p.add_argument("images", nargs="+", help="image files and/or folders")
  p.add_argument("-o", "--out", default="predictions", help="output folder")
  from segnext_jax.checkpoint import class_names
  from segnext_jax.data.ade20k_classes import ADE20K_CLASSES
  from segnext_jax.data.datasets import read_image
  from segnext_jax.eval_lib import EvalConfig, Predictor, add_inference_flags, load_for_inference
  add_inference_flags(p)
  args = p.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    model, variables, run_cfg, scale = load_for_inference(args)
    names = class_names(args.checkpoint) or (
        ADE20K_CLASSES if model.num_classes == 150 else [str(i) for i in range(model.num_classes)])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  predictor = Predictor(model, variables, EvalConfig(scale=scale, tta=args.tta, nmf_seed=args.nmf_seed))
  colors = palette(model.num_classes)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  failed = 0
  for i, path in enumerate(collect_images(args.images)):
    try:
      img = read_image(path)
    except (ValueError, OSError) as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
      continue
    pred = predictor.predict(img, i).argmax(-1).astype(np.uint8)
    cv2.imwrite(str(out / f"{path.stem}_classes.png"), pred)
    cv2.imwrite(str(out / f"{path.stem}_mask.png"), colors[pred][..., ::-1])
    cv2.imwrite(str(out / f"{path.stem}_overlay.png"),
                overlay_with_legend(img, pred, colors, names)[..., ::-1])
    present = ", ".join(str(names[c]) for c in np.unique(pred))
    print(f"{path}: {img.shape[1]}x{img.shape[0]} -> {out}/{path.stem}_*.png ({present})")
  return 1 if failed else 0


if __name__ == "__main__":
  from segnext_jax.cpu_runtime import reexec_with_huge_pages
  reexec_with_huge_pages()
  sys.exit(main())
