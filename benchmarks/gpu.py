"""One-call GPU benchmark: parity of T (fp32 and bf16, against mmseg torch fp32), inference T/L
at batch 1 and 16 (fp32 and bf16) against mmseg torch on the same GPU, and the train step T/L at
batch 16 with peak GPU memory; one table.

On a bare GPU machine (jax[cuda], flax, optax, orbax, torch CUDA installed) with mmseg's wheels
carried in (`pip download -d wheels mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 ftfy
regex tensorboardX` on a machine with internet):
  pip install --no-index --find-links wheels mmsegmentation==1.2.2 mmengine==0.10.7 \
      mmcv-lite==2.1.0 ftfy regex tensorboardX && pip install --no-deps -e .
  python benchmarks/gpu.py
  python benchmarks/gpu.py --dry-run   # the same code paths at toy sizes, on any backend (CI)
mmseg's published figures (A100): T/S/B/L 52.4/42.3/35.2/22.9 images/s inference; training
memory 17.9/21.5/31.0/43.3 GB at batch 16.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from inference import interleaved_ms  # noqa: E402


def reference(variant: str, tmp: Path, device: str):
  """(torch modules on device, converted JAX variables) of one random-weight mmseg SegNeXt."""
  from segnext_jax.mmseg_reference import TorchReference
  from segnext_jax import torch_io
  ref = TorchReference(variant, tmp)
  variables, _, _ = torch_io.convert_file(ref.path)
  ref.backbone.to(device)
  ref.head.to(device)
  return ref, variables


def torch_forward(ref, bases: np.ndarray, device: str, bf16: bool):
  import torch
  b = torch.from_numpy(bases).to(device)
  ref.head.hamburger.ham._build_bases = lambda *a, **k: b.clone()

  def fwd(x):
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
      out = ref.head(ref.backbone(x))
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return fwd


def inference_rows(variant: str, batches, size: int, runs: int, tmp: Path, device: str) -> list:
  import torch
  from segnext_jax import segnext
  ref, variables = reference(variant, tmp, device)
  rows = []
  for batch in batches:
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    xj = jax.device_put(x)
    for dtype in ("fp32", "bf16"):
      model = segnext(variant, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)
      bases = np.asarray(variables["nmf_bases"]["decode_head"]["hamburger"]["bases"])
      bases_b = np.array(np.broadcast_to(bases, (batch, *bases.shape)))
      fwd = jax.jit(lambda v, x: model.apply(v, x))
      tfwd = torch_forward(ref, bases_b, device, dtype == "bf16")
      out = np.asarray(jax.block_until_ready(fwd(variables, xj)), np.float32)
      ref_fp32 = torch_forward(ref, bases_b, device, False)(xt).float().cpu().numpy().transpose(0, 2, 3, 1)
      jms, tms = interleaved_ms([lambda: jax.block_until_ready(fwd(variables, xj)), lambda: tfwd(xt)], runs)
      rows.append(dict(what="inference", variant=variant.upper(), batch=batch, dtype=dtype,
                       jax=1e3 * batch / jms, torch=1e3 * batch / tms, unit="img/s",
                       err=float(np.abs(out - ref_fp32).max())))
  return rows


def train_rows(variant: str, batch: int, size: int, runs: int) -> list:
  """Each side in its own process (train_step.py), so each peak memory is its own."""
  res = {}
  for side in ("jax", "torch"):  # torch as mmseg users run it: glibc's own malloc
    env = {**os.environ, "SEGNEXT_JAX_MALLOC": "system"} if side == "torch" else None
    out = subprocess.run([sys.executable, str(HERE / "train_step.py"), "--variant", variant,
                          "--batch", str(batch), "--size", str(size), "--runs", str(runs),
                          "--side", side], capture_output=True, text=True, env=env)
    if out.returncode:
      sys.exit(f"train step {side} failed:\n{out.stderr[-3000:]}")
    res[side] = json.loads(out.stdout.strip().splitlines()[-1])
  return [dict(what="train step", variant=variant.upper(), batch=batch, dtype="fp32",
               jax=1e3 * batch / res["jax"]["ms"], torch=1e3 * batch / res["torch"]["ms"],
               unit="img/s", mem=(res["jax"]["peak_gb"], res["torch"]["peak_gb"]))]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="toy sizes (T only, 64 px, batch 2)")
  p.add_argument("--runs", type=int, default=10)
  args = p.parse_args()
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.dry_run:
    variants, batches, size, train_batch, runs = ("t",), (2,), 64, 2, 1
  else:
    variants, batches, size, train_batch, runs = ("t", "l"), (1, 16), 512, 16, args.runs
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in variants:
      rows += inference_rows(v, batches, size, runs, Path(tmp), device)
    for v in variants:
      rows += train_rows(v, train_batch, size, runs)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; {size}x{size}, median of {runs}")
  print("| measure | variant | batch | dtype | JAX | mmseg torch | JAX/torch | max abs err vs torch fp32 | peak GB JAX / torch |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mem = "%.2f / %.2f" % r["mem"] if "mem" in r else ""
    err = "%.1e" % r["err"] if "err" in r else ""
    print(f"| {r['what']} | {r['variant']} | {r['batch']} | {r['dtype']} | {r['jax']:.1f} {r['unit']} | "
          f"{r['torch']:.1f} | {r['jax'] / r['torch']:.2f}x | {err} | {mem} |")


if __name__ == "__main__":
  main()
