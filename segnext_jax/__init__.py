"""SegNeXt in JAX/Flax: MSCAN + LightHamHead, mmseg checkpoint import, training and evaluation.

Importing it changes nothing outside the package: the commands (segnext_jax.cli) opt into the
CPU malloc policy of cpu_memory.py, and a program of your own may call
`segnext_jax.cpu_memory.keep_freed_memory()` before it first uses JAX."""
from segnext_jax.ham_head import LightHamHead, Hamburger, nmf2d, random_bases
from segnext_jax.model import VARIANTS, SegNeXt, segnext, init_variables
from segnext_jax.mscan import MSCAN

__all__ = ["MSCAN", "LightHamHead", "Hamburger", "SegNeXt", "VARIANTS", "nmf2d", "random_bases",
           "segnext", "init_variables", "load_checkpoint", "Inferencer"]


def __getattr__(name):
  if name == "load_checkpoint":  # lazy: keeps orbax off the import path of the model code
    from segnext_jax.checkpoint import load_checkpoint
    return load_checkpoint
  if name == "Inferencer":
    from segnext_jax.inferencer import Inferencer
    return Inferencer
  raise AttributeError(name)
