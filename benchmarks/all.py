"""Every CPU benchmark in one run, in order, one table each: inference (T, L at batch 1 and 8),
the train step (T and L, batch 2), eval throughput (whole and TTA, cold and warm cache).

  python benchmarks/all.py [--quick]     # --quick: T only, fewer runs and images
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  variants = ["t"] if args.quick else ["t", "l"]
  runs = "3" if args.quick else "7"
  jobs = [["inference.py", "--variants", *variants, "--runs", runs]]
  jobs += [["train_step.py", "--variant", v, "--runs", "3" if v == "l" else runs] for v in variants]
  jobs += [["eval_throughput.py", "--images", "3" if args.quick else "10"]]
  print(f"# benchmarks/all.py, {datetime.datetime.now():%Y-%m-%d %H:%M}", flush=True)
  for job in jobs:
    print(f"\n$ python benchmarks/{' '.join(job)}", flush=True)
    out = subprocess.run([sys.executable, str(HERE / job[0]), *job[1:]], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    print("\n".join(lines) if out.returncode == 0 else f"FAILED:\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
  main()
