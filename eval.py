"""`python eval.py --help`: evaluation with mmseg's test pipelines (segnext_jax/cli/eval.py; installed as segnext-eval)."""
from segnext_jax import cli
from segnext_jax.cli.eval import build_parser, main  # noqa: F401 (the script's interface)

if __name__ == "__main__":
  cli.exit_with(main())
