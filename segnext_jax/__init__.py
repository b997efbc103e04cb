"""SegNeXt in JAX/Flax: MSCAN + LightHamHead, mmseg checkpoint import, training and evaluation."""
from segnext_jax import cpu_memory

cpu_memory.keep_freed_memory()  # first, before JAX starts threads: see cpu_memory.py

from segnext_jax.ham_head import LightHamHead, Hamburger, nmf2d, random_bases
from segnext_jax.model import VARIANTS, SegNeXt, segnext, init_variables
from segnext_jax.mscan import MSCAN

__all__ = ["MSCAN", "LightHamHead", "Hamburger", "SegNeXt", "VARIANTS", "nmf2d", "random_bases",
           "segnext", "init_variables", "load_checkpoint"]


def __getattr__(name):
  if name == "load_checkpoint":  # lazy: keeps orbax off the import path of the model code
    from segnext_jax.checkpoint import load_checkpoint
    return load_checkpoint
  raise AttributeError(name)
