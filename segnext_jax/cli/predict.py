"""Predict segmentation maps and write pictures: raw class-index PNG, colour mask, overlay + legend.

  python predict.py converted/segnext_t photo.jpg more/ -o out/ [--tta] [--save-scores]
  python predict.py segnext_mscan-t_ade20k clip.mp4 -o out/        # a video: mask and overlay videos
For each input image NAME this writes out/NAME_classes.png (uint8 class ids), out/NAME_mask.png
(the checkpoint's palette, else ADE20K's for 150 classes) and out/NAME_overlay.png (image blended
with the mask, and a legend of the classes present); --save-scores adds NAME_scores.npz (per-class
probabilities, float16 (H, W, K), and the class names). For a video NAME.mp4 (.avi, .mov, .mkv,
.webm) it writes NAME_mask.mp4 and NAME_overlay.mp4 at the source's frame rate, each frame
segmented as an image is. Images run one at a time with the fixed NMF bases, so a map does not
depend on which other images are given, or in what order.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from segnext_jax import cli, viz
from segnext_jax.cli import inference_flags
from segnext_jax.errors import InputError


def collect_images(inputs: list[str]) -> list[Path]:
  """The image files given and those in the folders given; InputError for a path that does not
  exist or a folder without images."""
  from segnext_jax.data.files import IMAGE_SUFFIXES
  files = []
  for item in map(Path, inputs):
    if item.is_dir():
      found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise InputError(f"{item}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
      files += found
    elif item.exists():
      files.append(item)
    else:
      raise InputError(f"{item}: no such file or directory")
  return files


def read_images(files: list[Path]) -> list[np.ndarray]:
  """Every image decoded, once (DataError naming the first that does not decode): before the
  model loads and before anything is written."""
  from segnext_jax.data.datasets import read_image
  return [read_image(path) for path in files]


def build_parser():
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", help="converted checkpoint dir or train.py workdir")
  p.add_argument("images", nargs="+", help="image files and/or folders")
  p.add_argument("-o", "--out", default="predictions", help="output folder")
  cli.add_flag(p, "save-scores", action="store_true", help="also write NAME_scores.npz: per-class "
               "probabilities (float16 (H, W, K), 'scores'; 'class_names'), for images")
  cli.add_flag(p, "distributed", action="store_true", help=cli.DISTRIBUTED_HELP + "; each "
               "process writes its share of the images")
  inference_flags.add_flags(p)
  return p


def write_outputs(out: Path, stem: str, img: np.ndarray, pred: np.ndarray, colors, names) -> None:
  cv2.imwrite(str(out / f"{stem}_classes.png"), pred.astype(np.uint8))
  cv2.imwrite(str(out / f"{stem}_mask.png"), viz.colorize(pred, colors)[..., ::-1])
  cv2.imwrite(str(out / f"{stem}_overlay.png"), viz.overlay_with_legend(img, pred, colors, names)[..., ::-1])


def main(argv=None) -> int:
  """Exit status 0, or 2 with one line naming the bad path, image or checkpoint (130: Ctrl-C);
  inputs are checked before the model loads, and nothing is written unless all of them read."""
  return cli.run(_main, argv)


def _main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  if args.distributed:
    cli.init_distributed()
  from segnext_jax.eval import Segmenter, spread
  # FFmpeg's own decoder messages off (set before OpenCV opens a video): a video that does not
  # decode is one line of ours
  os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
  from segnext_jax import video
  inputs = collect_images(args.images)
  files = [p for p in inputs if not video.is_video(p)]
  clips = [video.open_clip(p) for p in inputs if video.is_video(p)]  # each decodes: checked first
  if clips and args.save_scores:
    raise InputError(f"--save-scores writes images' scores; {clips[0].path} is a video")
  found = inference_flags.locate(args)
  k = (found.meta.get("model") or {}).get("num_classes", 150)
  if k > 256:
    raise InputError(f"{k} classes do not fit the uint8 class map")
  images = read_images(files)
  run = inference_flags.load(args, found)
  k = run.model.num_classes
  names, colors = viz.class_names(run.meta, k), viz.palette(run.meta, k)
  segmenter = Segmenter.for_model(run.model, run.cfg, notify=print)
  print(inference_flags.header(found, run))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  what = None
  if args.save_scores:
    what = lambda seg, v, img: (seg.classes(v, img), seg.probabilities(v, img))
  for i, result in spread.predict(segmenter, run.variables, images, what=what):
    path, img = files[i], images[i]
    pred = result[0] if args.save_scores else result
    write_outputs(out, path.stem, img, pred, colors, names)
    if args.save_scores:
      np.savez_compressed(out / f"{path.stem}_scores.npz", scores=result[1].astype(np.float16),
                          class_names=np.asarray(names))
    images[i] = None  # held from the check until its pictures are written
    present = ", ".join(str(names[c]) for c in np.unique(pred))
    print(f"{path}: {img.shape[1]}x{img.shape[0]} -> {out}/{path.stem}_*.png ({present})")
  for i in spread.my_share(len(clips)):  # a clip's frames share one canvas: one set of programs
    clip = clips[i]
    done = video.segment(clip, lambda frame: segmenter.classes(run.variables, frame), out, colors,
                         names)
    print(f"{clip.path}: {done['frames']} frames {clip.size[1]}x{clip.size[0]} at {clip.fps:g} fps "
          f"-> {done['mask']}, {done['overlay']}")
  return 0


console = cli.console(main)
