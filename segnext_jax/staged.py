"""SegNeXt inference as one compiled program per kind of part instead of one per network.

XLA compiles a program in time proportional to its fusions, and a whole-network program holds
every block's: ~5 s for T at each new input shape, most of an evaluation with test-time
augmentation (6 new shapes per image size). The blocks of a stage have equal shapes, so here
each stage's blocks share one program: a new shape compiles the stem, 3 patch embeds, 4 blocks,
4 norms and the head. Same modules, same variables, same numbers as `model.apply(train=False)`.

`StagedForward(model)(variables, images, valid)` runs it; `.lower(...).compile()` compiles every
part ahead (abstract arguments), as `jax.jit(f).lower(...).compile()` does for one program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from segnext_jax.ham_head import LightHamHead
from segnext_jax.mscan import LN_EPS, MSCABlock, OverlapPatchEmbed, StemConv
from segnext_jax.padding import stage_mask


def _sub(variables: dict, *path: str) -> dict:
  """The variables of one submodule: {collection: subtree} for the collections that have it."""
  out = {}
  for col, tree in variables.items():
    for key in path:
      if not isinstance(tree, dict) or key not in tree:
        break
      tree = tree[key]
    else:
      out[col] = tree
  return out


@dataclasses.dataclass
class _Lowered:
  parts: list

  def compile(self) -> None:
    for p in self.parts:
      p.compile()


class StagedForward:
  """(variables, images (B,H,W,3), valid (B,2) int32 or None) -> stride-8 logits, as the model."""

  def __init__(self, model):
    m = model
    self.model = m
    self._embed = [jax.jit(self._module_fn(StemConv(m.embed_dims[0], m.dtype)))] + [
        jax.jit(self._module_fn(OverlapPatchEmbed(d, m.dtype))) for d in m.embed_dims[1:]]
    self._block = [jax.jit(self._block_fn(MSCABlock(r, 0.0, m.dw_impl, m.dtype), 2 ** (s + 1)))
                   for s, r in enumerate(m.mlp_ratios, 1)]
    self._norm = jax.jit(lambda v, x: nn.LayerNorm(epsilon=LN_EPS, dtype=m.dtype).apply(v, x))
    head = LightHamHead(m.num_classes, m.head_channels, m.head_channels, m.nmf_rank, m.dropout,
                        m.nmf_grad, m.dtype)
    self._head = jax.jit(lambda v, feats, valid: head.apply(v, feats, train=False, valid=valid))

  @staticmethod
  def _module_fn(module: nn.Module) -> Callable:
    return lambda v, x: module.apply(v, x, train=False)

  @staticmethod
  def _block_fn(block: MSCABlock, stride: int) -> Callable:
    def fn(v, x, valid):
      mask = None if valid is None else stage_mask(valid, x.shape, stride)
      return block.apply(v, x, False, mask)
    return fn

  def _forward(self, variables: dict, images: Any, valid: Any, run: Callable) -> Any:
    """The forward, each part applied through `run(part, *args)`: a call, or a lowering."""
    bb = lambda *p: _sub(variables, "backbone", *p)
    x, feats = images, []
    for s, depth in enumerate(self.model.depths, 1):
      x = run(self._embed[s - 1], bb(f"patch_embed{s}"), x)
      for i in range(depth):
        x = run(self._block[s - 1], bb(f"block{s}_{i}"), x, valid)
      x = run(self._norm, bb(f"norm{s}"), x)
      feats.append(x)
    return run(self._head, _sub(variables, "decode_head"), feats[1:], valid)

  def __call__(self, variables: dict, images: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    images = jnp.asarray(images, self.model.dtype)
    return self._forward(variables, images, valid, lambda fn, *args: fn(*args))

  def lower(self, variables: dict, images: jax.ShapeDtypeStruct, valid=None) -> _Lowered:
    """Every part lowered for abstract inputs (each distinct program once)."""
    done: dict[tuple, tuple] = {}  # (part, argument shapes) -> (lowered, abstract output)

    def run(fn, *args):
      key = (id(fn), str(jax.tree.map(lambda a: (a.shape, a.dtype), args)))
      if key not in done:
        low = fn.lower(*args)
        done[key] = low, jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), low.out_info)
      return done[key][1]

    self._forward(variables, jax.ShapeDtypeStruct(images.shape, self.model.dtype), valid, run)
    return _Lowered([low for low, _ in done.values()])
