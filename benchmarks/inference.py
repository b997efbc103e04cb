"""Inference speed: jitted JAX SegNeXt vs mmseg's torch SegNeXt (eager), same weights, one run.

  python benchmarks/inference.py [--variants t l] [--batches 1 8] [--size 512] [--runs 7]
Weights: a random mmseg checkpoint (non-trivial BN stats) converted with convert/from_torch's
mapping; both sides compute the stride-8 logits of a Bx3xSxS batch with the same (fixed) NMF bases. The
GFLOP/s column is XLA's FLOP count of the compiled program over its time, next to the rate of a
large jitted matmul on the same machine: how far from the hardware limit the model runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np




def interleaved_ms(fns, runs: int, warmup: int = 2) -> list[float]:
  """Median ms of each fn, timed alternately run by run so that both see the same machine load."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      fn()
      ts.append((time.perf_counter() - t) * 1e3)
  return [statistics.median(ts) for ts in times]


def median_ms(fn, runs: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
  """The machine's jitted float32 matmul rate: the practical compute limit of this device."""
  x = jax.random.normal(jax.random.key(0), (n, n), np.float32)
  f = jax.jit(lambda a: a @ a)
  ms = median_ms(lambda: jax.block_until_ready(f(x)), runs)
  return 2 * n ** 3 / (ms * 1e-3) / 1e9


def program_gflop(compiled) -> float:
  """FLOPs of a compiled program (XLA's cost analysis), in GFLOP."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9


def bench_variant(variant: str, size: int, batch: int, runs: int, tmp: Path) -> dict:
  import torch
  from segnext_jax.mmseg_reference import TorchReference
  from segnext_jax import segnext, torch_io
  ref = TorchReference(variant, tmp)
  variables, _, _ = torch_io.convert_file(ref.path)
  model = segnext(variant)
  x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
  fixed = np.asarray(variables["nmf_bases"]["decode_head"]["hamburger"]["bases"])
  bases = np.array(np.broadcast_to(fixed, (batch, *fixed.shape)))
  t0 = time.perf_counter()  # compiled once; the stored fixed bases
  fwd = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  out = jax.block_until_ready(fwd(variables, x))
  compile_s = time.perf_counter() - t0
  gflop = program_gflop(fwd)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  bt = torch.from_numpy(bases)
  ref.head.hamburger.ham._build_bases = lambda *a, **k: bt.clone()
  with torch.inference_mode():
    torch_fn = lambda: ref.head(ref.backbone(xt))
    out_t = torch_fn().numpy().transpose(0, 2, 3, 1)
    jax_ms, torch_ms = interleaved_ms([lambda: jax.block_until_ready(fwd(variables, x)), torch_fn], runs)
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
  import torch
  peak = matmul_gflops()
  print(f"device: jax {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch threads {torch.get_num_threads()}; input Bx3x{args.size}x{args.size}, median of "
        f"{args.runs} interleaved runs after warm-up; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
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
