"""`python train.py --help`: the training command (segnext_jax/cli/train.py; installed as segnext-train)."""
from segnext_jax import cli
from segnext_jax.cli.train import build_parser, main, resolve  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
