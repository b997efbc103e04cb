"""Convert an mmseg 1.x / official SegNeXt torch checkpoint to a segnext-jax orbax checkpoint.

  python convert/from_torch.py segnext_mscan-t_...pth -o converted/segnext_t   # torch not needed
  python convert/from_torch.py segnext_mscan-t_ade20k   # by name -> ./segnext_mscan-t_ade20k_jax
A released model's name (segnext_mscan-{t,s,b,l}_ade20k, mscan-{t,s,b,l}_imagenet, or mmseg's
name or file name for it; docs/zoo.md) is downloaded once into the cache ($SEGNEXT_JAX_CACHE),
checked against the release's sha256, then converted; an existing file of that name wins.
Infers variant and num_classes from tensor shapes (a custom size, embed_dims / depths / head
channels of no released variant, is built on --variant, default t, with those sizes); fails with
one line naming any missing, unexpected or mis-shaped tensor, and then writes nothing. A .pth
written by convert/to_torch.py gives back its fixed NMF bases; any other gets bases drawn from
--nmf-seed.
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from segnext_jax import cli
from segnext_jax.config import Variant
from segnext_jax.errors import InputError


def build_parser() -> argparse.ArgumentParser:
  p = cli.parser(__doc__)
  p.add_argument("checkpoint", type=Path, help="mmseg/official .pth (segmentor or MSCAN backbone), "
                 "or a released model's name (docs/zoo.md)")
  p.add_argument("-o", "--out", type=Path, help="output directory (default: <checkpoint stem>_jax "
                 "beside the file; for a name, <name>_jax in the current directory)")
  p.add_argument("--variant", choices=typing.get_args(Variant),
                 help="model size; must match the shapes (default: inferred from them). For a custom "
                 "size: the base variant whose other settings (drop_path) apply (default t)")
  cli.add_flag(p, "nmf-rank", type=int, default=None,
               help="NMF rank R (a config choice, not a tensor shape). Default: MD_R of the config "
               "stored in the checkpoint; else 16 for mmseg 1.x checkpoints and official T/S, 64 for "
               "official B/L (their configs keep the Hamburger default)")
  cli.add_flag(p, "nmf-seed", type=int, default=0,
               help="seed of the fixed NMF initial bases stored with the model, when the .pth "
               "carries none of its own (default %(default)s)")
  cli.add_flag(p, "trust-pickle", action="store_true", help="allow full unpickling (unsafe)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  return p


def main(argv: list[str] | None = None) -> int:
  """Exit status 0, or 2 with one line naming the file and what is wrong with it (130: Ctrl-C)."""
  return cli.run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_absl()
  from segnext_jax import zoo
  rel = zoo.named(args.checkpoint)
  out = args.out or (Path(f"{rel.name}_jax") if rel else
                     args.checkpoint.with_name(args.checkpoint.stem + "_jax"))
  if out.exists() and not args.force:
    raise InputError(f"{out} already exists (use --force to replace it)")
  source = zoo.local(args.checkpoint)  # a name: the verified download
  if rel:
    print(f"{rel.name}: {source}")
  from segnext_jax import convert_map, torch_io
  from segnext_jax.checkpoint import save_converted
  variables, meta, report = torch_io.convert_file(source, args.variant or (rel and rel.variant),
                                                  args.nmf_rank, args.nmf_seed, args.trust_pickle)
  save_converted(out, variables, meta, overwrite=args.force)
  ignored = report.ignored
  size = (f"custom size ({convert_map.describe_size(report.custom_size)}) on variant "
          if report.custom_size else "variant ")
  print(f"{report.source_format}: {size}{report.variant}, num_classes {report.num_classes}, "
        f"{report.converted} tensors converted, {len(ignored)} ignored"
        + (f" ({', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''})" if ignored else ""))
  if not report.backbone_only:
    print(f"NMF rank {report.nmf_rank} ({report.nmf_rank_source}); inference bases {meta['nmf_bases']}")
  print(f"wrote {out}")
  return 0


console = cli.console(main)
