"""Write a segnext-jax checkpoint (converted or train.py) back as an mmseg 1.x segmentor .pth.

  python convert/to_torch.py converted/segnext_t -o segnext_t.pth    # needs: pip install -e .[convert]
mmseg 1.x EncoderDecoder keys; meta['cfg'] is the mmseg model config, meta['segnext_jax'] the NMF
rank and the fixed inference bases (docs/deploy.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from segnext_jax import cli
from segnext_jax.to_torch import export_checkpoint


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", type=Path, help="segnext-jax checkpoint directory (converted or train.py)")
  p.add_argument("-o", "--out", type=Path, required=True, help="output .pth")
  cli.add_flag(p, "step", type=int, default=None, help="checkpoint step (default: the latest)")
  return p


def main(argv: list[str] | None = None) -> int:
  """Exit status 0, or 2 with one line naming the bad path or step (130: Ctrl-C)."""
  return cli.run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  obj = export_checkpoint(args.checkpoint, args.out, args.step)
  ours = obj["meta"]["segnext_jax"]
  what = "MSCAN backbone" if ours["nmf_bases"] is None else f"NMF rank {ours['nmf_rank']}"
  print(f"variant {ours['variant']}, {what}: {len(obj['state_dict'])} tensors (mmseg 1.x keys); "
        f"wrote {args.out}")
  return 0


console = cli.console(main)
