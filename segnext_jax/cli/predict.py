"""Predict segmentation maps and write pictures: raw class-index PNG, colour mask, overlay + legend.

  python predict.py converted/segnext_t photo.jpg more/ -o out/ [--tta]
For each input image NAME this writes out/NAME_classes.png (uint8 class ids), out/NAME_mask.png
(the checkpoint's palette, else ADE20K's for 150 classes) and out/NAME_overlay.png (image blended
with the mask, and a legend of the classes present). Images run one at a time with the fixed NMF
bases, so a map does not depend on which other images are given, or in what order.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segnext_jax import cli
from segnext_jax.cli import inference_flags

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def palette(meta: dict, num_classes: int) -> np.ndarray:
  """The checkpoint's palette, ADE20K's for 150 classes, else a fixed pseudo-random one (RGB)."""
  from segnext_jax.data.ade20k_classes import ADE20K_PALETTE
  if meta.get("palette") and len(meta["palette"]) == num_classes:
    return np.array(meta["palette"], np.uint8)
  if num_classes == len(ADE20K_PALETTE):
    return np.array(ADE20K_PALETTE, np.uint8)
  rng = np.random.default_rng(12345)
  return rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)


def class_names(meta: dict, num_classes: int) -> list[str]:
  from segnext_jax.data.ade20k_classes import ADE20K_CLASSES
  if meta.get("class_names") and len(meta["class_names"]) == num_classes:
    return list(meta["class_names"])
  return list(ADE20K_CLASSES) if num_classes == 150 else [str(i) for i in range(num_classes)]


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
  """The image files given and those in the folders given; ValueError for a path that does not
  exist, a folder without images, or nothing found at all."""
  files = []
  for item in map(Path, inputs):
    if item.is_dir():
      found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise ValueError(f"{item}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
      files += found
    elif item.exists():
      files.append(item)
    else:
      raise FileNotFoundError(f"{item}: no such file or directory")
  return files


def check_images(files: list[Path]) -> None:
  """Every image decodes (DataError naming the first that does not), before the model loads and
  before anything is written."""
  from segnext_jax.data.datasets import read_image
  for path in files:
    read_image(path)


def build_parser():
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  p.add_argument("images", nargs="+", help="image files and/or folders")
  p.add_argument("-o", "--out", default="predictions", help="output folder")
  inference_flags.add_flags(p)
  return p


def write_outputs(out: Path, stem: str, img: np.ndarray, pred: np.ndarray, colors, names) -> None:
  cv2.imwrite(str(out / f"{stem}_classes.png"), pred.astype(np.uint8))
  cv2.imwrite(str(out / f"{stem}_mask.png"), colors[pred][..., ::-1])
  cv2.imwrite(str(out / f"{stem}_overlay.png"), overlay_with_legend(img, pred, colors, names)[..., ::-1])


def main(argv=None) -> int:
  """Exit status 0, or 2 with one line naming the bad path, image or checkpoint (130: Ctrl-C);
  inputs are checked before the model loads, and nothing is written unless all of them read."""
  return cli.run(_main, argv)


def _main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  from segnext_jax.data.datasets import read_image
  from segnext_jax.eval import Segmenter
  files = collect_images(args.images)
  meta = inference_flags.read_meta(args)
  k = (meta.get("model") or {}).get("num_classes", 150)
  if k > 256:
    raise ValueError(f"{k} classes do not fit the uint8 class map")
  check_images(files)
  run = inference_flags.load(args)
  k = run.model.num_classes
  names, colors = class_names(run.meta, k), palette(run.meta, k)
  segmenter = Segmenter.for_model(run.model, run.cfg, notify=print)
  print(f"checkpoint: {args.checkpoint} step {args.step}\ntest pipeline: "
        f"{inference_flags.describe(run.cfg)}\nNMF bases: {run.bases}")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for path in files:
    img = read_image(path)
    pred = segmenter.classes(run.variables, img)
    write_outputs(out, path.stem, img, pred, colors, names)
    present = ", ".join(str(names[c]) for c in np.unique(pred))
    print(f"{path}: {img.shape[1]}x{img.shape[0]} -> {out}/{path.stem}_*.png ({present})")
  return 0


console = cli.console(main)
