"""Evaluation spread over devices and processes: eval.py's images/s on 1 and 2 forced host devices
and in 1 and 2 localhost processes (jax.distributed), one run, the same checkpoint and images.

  python benchmarks/eval_scale.py [--variant t] [--images 12] [--scale 1024 256]

Each configuration runs eval.py twice on a shared compile cache and reports the second run (the
programs loaded, not compiled); every configuration must give the same confusion matrix. On a
machine with C cores the speed-up is bounded by C / (cores one device already uses): the point
on a small CPU is that the work splits, on a GPU host that every device works.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CONFIGS = {  # name -> (host devices per process, processes)
    "1 device, 1 process": (1, 1),
    "2 devices, 1 process": (2, 1),
    "1 device each, 2 processes": (1, 2),
}


def make_checkpoint(root: Path, variant: str) -> Path:
  """A random-init SegNeXt (150 classes) as a converted checkpoint."""
  import jax
  from segnext_jax import checkpoint, init_variables, segnext
  model = segnext(variant)
  variables = jax.tree.map(lambda x: jax.device_get(x), dict(init_variables(model, jax.random.key(0))))
  return checkpoint.save_converted(root / "ckpt", variables, dict(
      variant=variant, model={}, nmf_bases="fixed, drawn at init from seed 0"))


def run(config: tuple[int, int], ckpt: Path, data: Path, cache: Path, out: Path,
        scale: list[int]) -> tuple[float, dict]:
  """(wall seconds, --out JSON of process 0) of one eval.py run in this configuration."""
  devices, procs = config
  port = _free_port()
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={devices}".strip())
  args = [sys.executable, str(common.REPO / "eval.py"), str(ckpt), f"--data=ade20k:{data}",
          "--scale", *map(str, scale), f"--out={out}"] + (["--distributed"] if procs > 1 else [])
  t0 = time.perf_counter()
  running = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, **({"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                                "JAX_NUM_PROCESSES": str(procs),
                                                "JAX_PROCESS_ID": str(p)} if procs > 1 else {})))
             for p in range(procs)]
  for proc in running:
    _, err = proc.communicate()
    if proc.returncode:
      sys.exit(f"eval.py failed ({config}): {err.strip().splitlines()[-1]}")
  return time.perf_counter() - t0, json.loads(out.read_text())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="t")
  p.add_argument("--images", type=int, default=12)
  p.add_argument("--scale", type=int, nargs=2, default=[1024, 256], metavar=("LONG", "SHORT"))
  args = p.parse_args()
  root = Path(tempfile.mkdtemp(prefix="segnext-eval-scale-"))
  data = root / "ade"
  common.write_ade_eval_tree(data, args.images)
  ckpt = make_checkpoint(root, args.variant)
  rows, confusion = [], None
  for name, config in CONFIGS.items():
    cache = root / f"cache-{config[0]}x{config[1]}"
    run(config, ckpt, data, cache, root / "warm.json", args.scale)  # compiles, fills the cache
    wall, doc = run(config, ckpt, data, cache, root / "out.json", args.scale)
    confusion = confusion if confusion is not None else doc["confusion"]
    if doc["confusion"] != confusion:
      sys.exit(f"{name}: another confusion matrix than the 1-device run's")
    rows.append((name, doc["devices"], doc["processes"], doc["images_per_s"], wall))
  print(f"SegNeXt-{args.variant.upper()} (random init), {args.images} ADE-sized images, scale "
        f"{args.scale[0]}x{args.scale[1]}, whole; {os.cpu_count()} CPU cores; second run of each "
        "(programs from the compile cache); confusion matrices equal in every row\n")
  print("| configuration | devices | processes | eval images/s | eval.py wall s |")
  print("|---|---|---|---|---|")
  for name, devices, procs, ips, wall in rows:
    print(f"| {name} | {devices} | {procs} | {ips:.2f} | {wall:.1f} |")


if __name__ == "__main__":
  main()
