"""`python convert/from_torch.py --help`: mmseg/official .pth -> segnext-jax (segnext_jax/cli/from_torch.py; segnext-convert)."""
from segnext_jax import cli
from segnext_jax.cli.from_torch import build_parser, main  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
