"""Export a segnext-jax checkpoint for deployment: ONNX (onnxruntime) or serialized StableHLO.

  python export.py CKPT --format onnx -o segnext_t.onnx        # needs: pip install -e .[export]
  python export.py CKPT --format stablehlo -o segnext_t.stablehlo
One input: float32 NHWC normalized images (B, H, W, 3), B, H and W dynamic (H, W multiples of 32).
One output: logits (B, H/8, W/8, K), the numbers of `model.apply(variables, images, train=False)`,
with the weights and the fixed NMF bases as constants (docs/deploy.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from segnext_jax import cli
from segnext_jax.export import FORMATS, OPSET, export_file
from segnext_jax.model import LOGIT_STRIDE, TOTAL_STRIDE


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", type=Path, help="segnext-jax checkpoint directory (converted or train.py)")
  p.add_argument("--format", choices=FORMATS, required=True,
                 help="onnx: an onnxruntime graph with metadata (mean, std, class names); "
                 "stablehlo: jax.export's serialized program")
  p.add_argument("-o", "--out", type=Path, required=True, help="output file")
  cli.add_flag(p, "opset", type=int, default=OPSET, help="ONNX opset (default %(default)s)")
  cli.add_flag(p, "platforms", default=None,
               help="StableHLO target platforms, comma-separated (default: this machine's, e.g. "
               "cpu; 'cpu,cuda' lowers one file for both)")
  return p


def main(argv: list[str] | None = None) -> int:
  """Exit status 0, or 2 with one line naming the bad path, step or setting (130: Ctrl-C)."""
  return cli.run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  platforms = tuple(args.platforms.split(",")) if args.platforms else None
  out = export_file(args.checkpoint, args.format, args.out, args.opset, platforms)
  up = TOTAL_STRIDE // LOGIT_STRIDE
  print(f"wrote {out} ({args.format}, {out.stat().st_size / 2**20:.1f} MiB): "
        f"images (B, {TOTAL_STRIDE}h, {TOTAL_STRIDE}w, 3) float32 -> logits (B, {up}h, {up}w, K)")
  return 0


console = cli.console(main)
