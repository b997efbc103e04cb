"""`python export.py --help`: ONNX / StableHLO export (segnext_jax/cli/export.py; installed as segnext-export)."""
from segnext_jax import cli
from segnext_jax.cli.export import build_parser, main  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
