"""`python predict.py --help`: class maps, masks and overlays of images (segnext_jax/cli/predict.py; installed as segnext-predict)."""
from segnext_jax import cli
from segnext_jax.cli.predict import build_parser, main  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
