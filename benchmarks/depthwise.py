"""Depthwise conv forward and forward+backward at MSCA's shapes, for each implementation, and
torch's (the grouped nn.Conv2d mmseg runs) in the same run: the evidence for backend.py's
`dw_impl` choice on the machine at hand.

  python benchmarks/depthwise.py [--batch 2] [--size 512] [--runs 10] [--impls shift lax lax_autodiff]

Shapes: stage 1-4 of SegNeXt-T/L at a size x size input (strides 4..32, MSCA width = the stage's
width, the MLP's 3x3 at mlp_ratio x width); per stage and kernel, the median ms of each impl.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path
from segnext_jax.depthwise import IMPLS, depthwise_conv2d

KERNELS = [(5, 5), (1, 7), (7, 1), (1, 11), (11, 1), (1, 21), (21, 1)]


def shapes(variant: str, batch: int, size: int) -> list[tuple[str, tuple, tuple[int, int]]]:
  """(label, NHWC input shape, kernel) of every distinct depthwise conv of one variant."""
  from segnext_jax.model import MLP_RATIOS, VARIANTS
  out = []
  for s, (dim, ratio) in enumerate(zip(VARIANTS[variant]["embed_dims"], MLP_RATIOS), 1):
    hw = size // 2 ** (s + 1)
    for k in KERNELS:
      out.append((f"stage {s} {k[0]}x{k[1]}", (batch, hw, hw, dim), k))
    out.append((f"stage {s} mlp 3x3", (batch, hw, hw, int(dim * ratio)), (3, 3)))
  return out


def jax_fns(impl: str, shape: tuple, k: tuple[int, int]):
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kk, (*k, 1, shape[-1]))
  fwd = jax.jit(lambda x, w: depthwise_conv2d(x, w, impl=impl))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(depthwise_conv2d(x, w, impl=impl) ** 2), (0, 1)))
  jax.block_until_ready((fwd(x, w), grad(x, w)))
  return (lambda: jax.block_until_ready(fwd(x, w))), (lambda: jax.block_until_ready(grad(x, w)))


def torch_fns(shape: tuple, k: tuple[int, int]):
  import torch
  b, h, w, c = shape
  conv = torch.nn.Conv2d(c, c, k, padding=(k[0] // 2, k[1] // 2), groups=c)
  x = torch.randn(b, c, h, w, requires_grad=True)

  def fwd():
    with torch.no_grad():
      conv(x)

  def fwd_bwd():
    (conv(x) ** 2).sum().backward()
  return fwd, fwd_bwd


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()
  common.keep_freed_memory()  # first: before JAX starts
  cols = [*args.impls, *([] if args.no_torch else ["torch"])]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.variant.upper()} "
        f"{args.batch}x{args.size}x{args.size}; median ms of {args.runs}, forward / forward+backward")
  print("| conv | input | " + " | ".join(cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  totals = {c: np.zeros(2) for c in cols}
  for label, shape, k in shapes(args.variant, args.batch, args.size):
    fns = [jax_fns(impl, shape, k) for impl in args.impls]
    if not args.no_torch:
      fns.append(torch_fns(shape, k))
    fwd = common.interleaved_ms([f for f, _ in fns], args.runs)
    both = common.interleaved_ms([g for _, g in fns], args.runs)
    for c, a, b in zip(cols, fwd, both):
      totals[c] += (a, b)
    cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(fwd, both))
    print(f"| {label} | {'x'.join(map(str, shape[1:]))} | {cells} |")
  print("| **sum** | | " + " | ".join(f"**{t[0]:.1f} / {t[1]:.1f}**" for t in totals.values()) + " |")


if __name__ == "__main__":
  main()
