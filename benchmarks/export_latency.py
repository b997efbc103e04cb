"""Exported-model CPU latency: onnxruntime and deserialized StableHLO next to the jitted JAX model.

  python benchmarks/export_latency.py [--variants t l] [--size 512] [--runs 7]
Weights: a random mmseg checkpoint converted with convert/from_torch's mapping; export.py writes
both files; all three compute the logits of the same 1xSxSx3 image, timed interleaved.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import common  # benchmarks/common.py: this script's folder is first on sys.path


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def runners(ckpt: Path, tmp: Path, x: np.ndarray) -> tuple[dict, dict]:
  """{name: zero-arg fn} for JAX, onnxruntime and StableHLO, and {name: export seconds}."""
  import onnxruntime as ort
  from jax import export
  from segnext_jax.checkpoint import load_checkpoint
  from segnext_jax import export as ex
  secs = {}
  for fmt in ex.FORMATS:
    _, secs[fmt] = timed(lambda: ex.export_file(ckpt, fmt, tmp / f"model.{fmt}"))
  model, variables = load_checkpoint(ckpt)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  sess = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
  shlo = jax.jit(export.deserialize(bytearray((tmp / "model.stablehlo").read_bytes())).call)
  fns = dict(jax=lambda: np.asarray(fwd(variables, x)),
             onnxruntime=lambda: sess.run(None, {"images": x})[0],
             stablehlo=lambda: np.asarray(shlo(x)))
  return fns, secs


def bench_variant(variant: str, size: int, runs: int, tmp: Path) -> dict:
  from segnext_jax.mmseg_reference import TorchReference
  from segnext_jax import torch_io
  from segnext_jax.checkpoint import save_converted
  variables, meta, _ = torch_io.convert_file(TorchReference(variant, tmp).path)
  ckpt = save_converted(tmp / "ckpt", variables, meta)
  x = common.images(1, size)
  fns, secs = runners(ckpt, tmp, x)
  outs = {}
  for name, fn in fns.items():
    outs[name], secs[f"{name}_first_call"] = timed(fn)
  ms = dict(zip(fns, common.interleaved_ms(list(fns.values()), runs)))
  err = {n: float(np.abs(o - outs["jax"]).max()) for n, o in outs.items() if n != "jax"}
  return dict(variant=variant.upper(), ms=ms, secs=secs, err=err,
              mib={f: (tmp / f"model.{f}").stat().st_size / 2**20 for f in ("onnx", "stablehlo")})


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", nargs="+", default=["t", "l"], choices=["t", "s", "b", "l"])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--runs", type=int, default=7)
  args = p.parse_args()
  common.keep_freed_memory()  # first: before JAX starts
  import onnxruntime as ort
  print(f"jax {jax.__version__} ({jax.default_backend()}), onnxruntime {ort.__version__}; "
        f"input 1x{args.size}x{args.size}x3, median of {args.runs} interleaved runs after warm-up")
  print("| variant | JAX ms | onnxruntime ms | StableHLO ms | export s (onnx / stablehlo) | "
        "first call s (jax / ort / shlo) | MiB (onnx / shlo) | max |diff| vs JAX (ort / shlo) |")
  print("|---|---|---|---|---|---|---|---|")
  for v in args.variants:
    with tempfile.TemporaryDirectory() as tmp:
      r = bench_variant(v, args.size, args.runs, Path(tmp))
    s, m = r["secs"], r["ms"]
    print(f"| {r['variant']} | {m['jax']:.0f} | {m['onnxruntime']:.0f} | {m['stablehlo']:.0f} | "
          f"{s['onnx']:.0f} / {s['stablehlo']:.0f} | {s['jax_first_call']:.0f} / "
          f"{s['onnxruntime_first_call']:.1f} / {s['stablehlo_first_call']:.0f} | "
          f"{r['mib']['onnx']:.0f} / {r['mib']['stablehlo']:.0f} | "
          f"{r['err']['onnxruntime']:.1e} / {r['err']['stablehlo']:.1e} |", flush=True)


if __name__ == "__main__":
  main()
