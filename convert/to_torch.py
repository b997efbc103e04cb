"""`python convert/to_torch.py --help`: segnext-jax -> mmseg .pth (segnext_jax/cli/to_torch.py; segnext-to-torch)."""
from segnext_jax import cli
from segnext_jax.cli.to_torch import build_parser, main  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
