"""Flags and checkpoint loading shared by eval.py and predict.py (the test pipeline, the NMF
bases, the compile cache): `locate` checks the checkpoint and reads its metadata before anything
heavy, then one `load` of that step gives the model, variables and inference config."""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from segnext_jax import cli
from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.views import PIPELINES
from segnext_jax.recipes import recipe_of

if TYPE_CHECKING:
  from segnext_jax.checkpoint import Located

PIPELINE_HELP = (
    "mmseg1 (default): mmseg 1.x; single scale = keep-ratio resize into --scale, zero-pad to /32; "
    "--tta = its ADE20K tta_pipeline: resize the ORIGINAL image by 0.5..1.75 (--scale unused), "
    "flip, pad to /32, mean of softmax (SegTTAModel). official: the SegNeXt repository (mmseg "
    "0.24); single scale = keep-ratio resize into --scale, then a second resize up to multiples "
    "of 32 (ResizeToMultiple, no padding); --tta = MultiScaleFlipAug(img_scale=--scale, ratios "
    "0.5..1.75, flip), each view resized that way, mean of softmax")


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The inference flags of eval.py and predict.py."""
  cli.add_flag(parser, "step", type=int, default=None,
               help="checkpoint step to use (default: the latest complete one; CKPT/checkpoints/N "
               "as the checkpoint path picks step N too)")
  cli.add_flag(parser, "pipeline", choices=PIPELINES, default="mmseg1", help=PIPELINE_HELP)
  cli.add_flag(parser, "tta", action="store_true",
               help="multi-scale (0.5-1.75) + flip, softmax averaged, as --pipeline defines it")
  cli.add_flag(parser, "scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
               help="test resize bound; default: the training run's resize_scale, else the --data "
               "dataset's recipe (segnext_jax/recipes.py: Cityscapes 2048 1024), else ADE20K's 2048 512")
  cli.add_flag(parser, "mode", choices=["whole", "slide"], default=None,
               help="default: the training run's eval_mode, else the --data dataset's recipe "
               "(Cityscapes: slide, 1024 window, 768 stride), else whole")
  cli.add_flag(parser, "crop", type=int, nargs=2, default=None, metavar=("H", "W"),
               help="slide window; default as --mode's (ADE20K: 512 512)")
  cli.add_flag(parser, "stride", type=int, nargs=2, default=None, metavar=("H", "W"),
               help="slide stride; default as --mode's (ADE20K: 341 341)")
  cli.add_flag(parser, "buckets-per-octave", type=int, default=InferenceConfig.buckets_per_octave,
               help="whole mode: views run zero-padded to this many sizes per octave (exact: the "
               "model masks the padding), so images of many sizes share a few compiled programs; "
               "0 = each view at its own /32 shape")
  cli.add_flag(parser, "nmf-seed", type=int, default=None,
               help="replace the checkpoint's fixed NMF bases by bases drawn from this seed")
  cli.add_flag(parser, "compile-cache", default=None, help=cli.COMPILE_CACHE_HELP)


@dataclasses.dataclass(frozen=True)
class Loaded:
  model: object
  variables: dict
  meta: dict
  cfg: InferenceConfig
  bases: str  # which NMF bases inference uses, in words


def locate(args: argparse.Namespace) -> Located:
  """The checkpoint the flags name, its path and step checked and its metadata read (cheap: no
  arrays); `load` restores that same step."""
  from segnext_jax import checkpoint
  return checkpoint.locate(args.checkpoint, args.step)


def load(args: argparse.Namespace, found: Located, batch_size: int = 1) -> Loaded:
  """Restore the located step and build the inference config from the flags and its run config."""
  from segnext_jax import checkpoint
  from segnext_jax.model import fixed_bases
  cli.enable_compile_cache(args.compile_cache)
  model, variables, meta = checkpoint.load_located(found)
  bases = meta.get("nmf_bases") or "fixed (stored with the checkpoint)"
  if args.nmf_seed is not None:
    variables = {**variables, **fixed_bases(model, args.nmf_seed)}
    bases = f"fixed, drawn from seed {args.nmf_seed} (--nmf-seed; the stored ones unused)"
  train = meta.get("config") or recipe_of(getattr(args, "data", None))
  given = dict(scale=args.scale, mode=args.mode, crop=args.crop, stride=args.stride)
  cfg = InferenceConfig.from_train(
      train, pipeline=args.pipeline, tta=args.tta, batch_size=batch_size,
      buckets_per_octave=args.buckets_per_octave,
      **{k: v if isinstance(v, str) else tuple(v) for k, v in given.items() if v is not None})
  return Loaded(model, variables, meta, cfg, bases)


def header(found: Located, run: Loaded) -> str:
  """The lines eval.py and predict.py start with: the checkpoint, test pipeline and NMF bases."""
  return (f"checkpoint: {found.dir} step {found.step}\ntest pipeline: {describe(run.cfg)}\n"
          f"NMF bases: {run.bases}")


def describe(cfg: InferenceConfig) -> str:
  """One line naming the test pipeline in use."""
  bound = f"{cfg.scale[0]}x{cfg.scale[1]}"
  if not cfg.tta:
    views = f"single scale into {bound}"
  else:
    of = "the original size" if cfg.pipeline == "mmseg1" else bound
    views = f"TTA: {of} x 0.5-1.75, flipped and not, mean of softmax"
  window = f", windows {cfg.crop} stride {cfg.stride}" if cfg.mode == "slide" else ""
  return f"{cfg.pipeline} pipeline, {views}, {cfg.mode}{window}"
