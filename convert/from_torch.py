"""Convert an mmseg 1.x / official SegNeXt torch checkpoint to a segnext-jax orbax checkpoint.

  python convert/from_torch.py segnext_mscan-t_...pth -o converted/segnext_t
Infers variant and num_classes from tensor shapes; fails with one line naming any missing,
unexpected or mis-shaped tensor, and then writes nothing.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segnext_jax import cli, convert_map, torch_io
from segnext_jax.checkpoint import save_converted


def _main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", type=Path, help="mmseg/official .pth (segmentor or MSCAN backbone)")
  p.add_argument("-o", "--out", type=Path, help="output directory (default: <checkpoint stem>_jax)")
  p.add_argument("--variant", choices=sorted(["t", "s", "b", "l"]), help="must match the shapes")
  p.add_argument("--nmf-rank", "--nmf_rank", type=int, default=None,
                 help="NMF rank R (a config choice, not a tensor shape). Default: MD_R of the config "
                 "stored in the checkpoint; else 16 for mmseg 1.x checkpoints and official T/S, 64 for "
                 "official B/L (their configs keep the Hamburger default)")
  p.add_argument("--nmf-seed", "--nmf_seed", type=int, default=0,
                 help="seed of the fixed NMF initial bases stored with the model (inference)")
  p.add_argument("--trust-pickle", "--trust_pickle", action="store_true", help="allow full unpickling (unsafe)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "_jax")
  if out.exists() and not args.force:
    raise convert_map.ConversionError(f"{out} already exists (use --force to replace it)")
  variables, meta, report = torch_io.convert_file(args.checkpoint, args.variant, args.nmf_rank,
                                                  args.nmf_seed, args.trust_pickle)
  save_converted(out, variables, meta, overwrite=args.force)
  print(f"{report.source_format}: variant {report.variant}, num_classes {report.num_classes}, "
        f"{report.converted} tensors converted, {len(report.ignored)} ignored"
        + (f" ({', '.join(report.ignored[:4])}{' ...' if len(report.ignored) > 4 else ''})" if report.ignored else ""))
  if not report.backbone_only:
    print(f"NMF rank {report.nmf_rank} ({report.nmf_rank_source}); fixed inference bases from seed {args.nmf_seed}")
  print(f"wrote {out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Exit status 0, or 2 with one line naming the file and what is wrong with it (130: Ctrl-C)."""
  return cli.run(_main, argv)


if __name__ == "__main__":
  logging.getLogger("absl").setLevel(logging.ERROR)
  cli.exit_with(main())
