"""Training-step speed and peak memory: JAX (jit: forward, mmseg CE, backward, AdamW, BN stats)
vs mmseg torch (same model size, same batch, AdamW), one run; each side in its own subprocess so
peak RSS is its own.

  python benchmarks/train_step.py [--variant t] [--batch 2] [--size 512] [--runs 5]

The JAX side is a plain process that imports segnext_jax (so it runs with segnext_jax.cpu_memory's
malloc policy); the torch side is mmseg as its users run it, glibc's default malloc. A third row
runs torch under our malloc policy too: the policy is not JAX-specific, and that row shows what
it is worth to torch. GFLOP/s is XLA's FLOP count of the step over its time, next to the rate of
a large jitted matmul (the machine's practical limit). On a GPU, peak memory is the device's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from inference import matmul_gflops, median_ms, program_gflop  # benchmarks/ is on sys.path


def run_jax(args) -> dict:
  import jax
  from segnext_jax.model import init_variables
  from segnext_jax.config import TrainConfig
  from segnext_jax.train_lib import build_model, create_train_state, jit_train_step, make_mesh, shard_batch
  cfg = TrainConfig(variant=args.variant, batch_size=args.batch, precision=args.precision,
                    remat=args.remat, nmf_grad=args.nmf_grad)
  model = build_model(cfg, 150)
  mesh = make_mesh()
  state = create_train_state(cfg, model, init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  batch = shard_batch({"image": rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32),
                       "label": rng.integers(0, 150, (args.batch, args.size, args.size)).astype(np.int32)}, mesh)
  key = jax.random.key(1)
  t0 = time.perf_counter()  # compiled once: the FLOP count and every step use this program
  step = jit_train_step(cfg, mesh).lower(state, batch, key).compile()
  gflop = program_gflop(step)
  state, m = step(state, batch, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  holder = {"s": state}

  def one():
    holder["s"], metrics = step(holder["s"], batch, key)
    jax.block_until_ready(metrics)
  ms = median_ms(one, args.runs, warmup=1)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform == "gpu" else None
  peak = stats["peak_bytes_in_use"] / 2**30 if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return {"ms": ms, "compile_s": compile_s, "peak_gb": peak, "device": dev.device_kind,
          "gflop": gflop, "matmul_gflops": matmul_gflops()}


def run_torch(args) -> dict:
  import torch
  from segnext_jax.mmseg_reference import mmseg_segmentor_modules
  backbone, head = mmseg_segmentor_modules(args.variant)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  backbone, head = backbone.to(dev).train(), head.to(dev).train()
  params = list(backbone.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)).to(dev)
  y = torch.from_numpy(rng.integers(0, 150, (args.batch, args.size, args.size))).to(dev)

  def one():
    opt.zero_grad()
    logits = head(backbone(x))
    logits = torch.nn.functional.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
    loss.backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
  ms = median_ms(one, args.runs, warmup=1)
  peak = (torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda"
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  return {"ms": ms, "peak_gb": peak, "threads": torch.get_num_threads()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t", choices=["t", "s", "b", "l"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
  p.add_argument("--remat", action="store_true")
  p.add_argument("--nmf-grad", default="unroll", choices=["unroll", "one_step"])
  p.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.side:
    print(json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
    return
  res = {}
  system = {**os.environ, "SEGNEXT_JAX_MALLOC": "system"}
  for name, side, env in (("jax", "jax", os.environ), ("torch", "torch", system),
                          ("torch_policy", "torch", os.environ)):
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side],
                         capture_output=True, text=True, env=env)
    if out.returncode:
      sys.exit(f"{name} side failed:\n{out.stderr[-3000:]}")
    res[name] = json.loads(out.stdout.strip().splitlines()[-1])
  j, t, tp = res["jax"], res["torch"], res["torch_policy"]
  print(f"SegNeXt-{args.variant.upper()} train step, batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.precision}{', remat' if args.remat else ''}, nmf grad {args.nmf_grad}; "
        f"device {j['device']}; median of {args.runs}")
  rate = j["gflop"] / (j["ms"] * 1e-3)
  print(f"machine limit: jitted 2048^2 float32 matmul {j['matmul_gflops']:.0f} GFLOP/s; "
        f"the step is {j['gflop']:.1f} GFLOP (XLA cost analysis)")
  print("| framework | ms/step | images/s | torch/this | GFLOP/s (of matmul's) | peak memory GB | compile s |")
  print("|---|---|---|---|---|---|---|")
  print(f"| JAX (jit), segnext_jax imported | {j['ms']:.0f} | {1e3 * args.batch / j['ms']:.2f} | "
        f"{t['ms'] / j['ms']:.2f}x | {rate:.0f} ({100 * rate / j['matmul_gflops']:.0f}%) | "
        f"{j['peak_gb']:.2f} | {j['compile_s']:.0f} |")
  print(f"| mmseg torch (glibc malloc) | {t['ms']:.0f} | {1e3 * args.batch / t['ms']:.2f} | 1.00x | - | "
        f"{t['peak_gb']:.2f} | - |")
  print(f"| mmseg torch under segnext_jax's malloc policy | {tp['ms']:.0f} | "
        f"{1e3 * args.batch / tp['ms']:.2f} | {t['ms'] / tp['ms']:.2f}x | - | {tp['peak_gb']:.2f} | - |")


if __name__ == "__main__":
  main()
