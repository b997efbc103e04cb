"""Inference speed: jitted JAX SegNeXt vs mmseg's torch SegNeXt (eager), same weights, one run.

  python benchmarks/inference.py [--variants t l] [--batches 1 8] [--size 512] [--runs 7]
Weights: a random mmseg checkpoint (non-trivial BN stats) converted with convert/from_torch's
mapping; both sides compute the stride-8 logits of a Bx3xSxS batch with the same (fixed) NMF bases. The
GFLOP/s column is XLA's FLOP count of the compiled program over its time, next to the rate of a
large jitted matmul on the same machine: how far from the hardware limit the model runs. Both
sides share one process, which opts in to segnext_jax's malloc policy first (cpu_memory.py), as
the commands do.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path


def bench_variant(variant: str, size: int, batch: int, runs: int, tmp: Path) -> dict:
  import torch
  from segnext_jax.mmseg_reference import TorchReference, fix_nmf_bases
  from segnext_jax import segnext, torch_io
  ref = TorchReference(variant, tmp)
  variables, _, _ = torch_io.convert_file(ref.path)
  model = segnext(variant)
  x = common.images(batch, size)
  fixed = np.asarray(variables["nmf_bases"]["decode_head"]["hamburger"]["bases"])  # (C, R)
  t0 = time.perf_counter()  # compiled once; the stored fixed bases
  fwd = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  out = jax.block_until_ready(fwd(variables, x))
  compile_s = time.perf_counter() - t0
  gflop = common.program_gflop(fwd)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  fix_nmf_bases(ref.head, fixed)
  with torch.inference_mode():
    torch_fn = lambda: ref.head(ref.backbone(xt))
    out_t = torch_fn().numpy().transpose(0, 2, 3, 1)
    jax_ms, torch_ms = common.interleaved_ms([lambda: jax.block_until_ready(fwd(variables, x)), torch_fn], runs)
  return dict(variant=variant.upper(), batch=batch, jax_ms=jax_ms / batch, torch_ms=torch_ms / batch,
              ratio=torch_ms / jax_ms, compile_s=compile_s, gflops=gflop / (jax_ms * 1e-3),
              max_abs_diff=float(np.abs(np.asarray(out) - out_t).max()))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", nargs="+", default=["t", "l"], choices=["t", "s", "b", "l"])
  p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=7)
  args = p.parse_args()
  policy = common.keep_freed_memory()  # first: before JAX starts (both sides share the process)
  import torch
  peak = common.matmul_gflops()
  print(f"device: jax {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch threads {torch.get_num_threads()}; input Bx3x{args.size}x{args.size}, median of "
        f"{args.runs} interleaved runs after warm-up; malloc policy {'on' if policy else 'off'}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  print(f"machine limit: jitted 2048^2 float32 matmul {peak:.0f} GFLOP/s")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in args.variants:
      for b in args.batches:
        rows.append(bench_variant(v, args.size, b, args.runs, Path(tmp)))
  print("| variant | batch | JAX ms/img | torch ms/img | torch/JAX | JAX GFLOP/s (of matmul's) | JAX compile s | max abs diff |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['batch']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{r['gflops']:.0f} ({100 * r['gflops'] / peak:.0f}%) | {r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
  main()
