"""SegNeXt = MSCAN backbone + LightHamHead (paper Fig. 2/3); the variant table of the paper."""
from __future__ import annotations

import functools

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segnext_jax.depthwise import Impl
from segnext_jax.ham_head import LightHamHead, NMFGrad
from segnext_jax.mscan import MSCAN, STAGE_STRIDES
from segnext_jax.padding import Padding

# One row per released variant (mmseg 1.x configs/segnext, ADE20K 512x512).
VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), head_channels=256, drop_path=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), head_channels=256, drop_path=0.1),
    "b": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), head_channels=512, drop_path=0.1),
    "l": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), head_channels=1024, drop_path=0.3),
}
MLP_RATIOS = (8, 8, 4, 4)
# The network's strides, in input pixels, from the backbone's stages:
TOTAL_STRIDE = STAGE_STRIDES[-1]  # the last stage's: padded inference needs multiples of it
LOGIT_STRIDE = STAGE_STRIDES[1]   # the logits': the head predicts at its first input, stage 2


class SegNeXt(nn.Module):
  """Images (B,H,W,3), normalized, -> logits (B, ceil(H/8), ceil(W/8), num_classes).

  Variables: 'params', 'batch_stats' and 'nmf_bases' (the fixed NMF initial bases inference
  uses, drawn once at init). rng streams: 'nmf' (training's per-image NMF bases; at inference
  only for variables without 'nmf_bases') and, in training, 'dropout' (DropPath, Dropout2d).
  `valid` (B, 2), inference on padded images: each image's (h, w) before the padding, multiples
  of TOTAL_STRIDE (32); the logits inside (h, w) / LOGIT_STRIDE (8) are those of the unpadded
  image (see padding.py).
  Its parts, the units StagedForward compiles one by one, are named by `is_part`.
  """
  embed_dims: Sequence[int] = VARIANTS["t"]["embed_dims"]
  depths: Sequence[int] = VARIANTS["t"]["depths"]
  head_channels: int = 256
  drop_path: float = 0.1
  num_classes: int = 150
  nmf_rank: int = 16
  mlp_ratios: Sequence[float] = MLP_RATIOS
  dropout: float = 0.1
  nmf_grad: NMFGrad = "unroll"
  remat: bool = False
  dw_impl: Impl = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               nmf_bases: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    want = (images.shape[0], self.head_channels, self.nmf_rank)
    if nmf_bases is not None and tuple(nmf_bases.shape) != want:
      raise ValueError(f"nmf_bases has shape {tuple(nmf_bases.shape)}, expected {want} (B, C, R)")
    pad = Padding(valid)
    feats = MSCAN(self.embed_dims, self.depths, self.mlp_ratios, self.drop_path, self.remat,
                  self.dw_impl, self.dtype, name="backbone")(images, train=train, pad=pad)
    return LightHamHead(self.num_classes, self.head_channels, self.head_channels, self.nmf_rank,
                        self.dropout, self.nmf_grad, self.dtype, name="decode_head")(
                            feats[1:], train=train, nmf_bases=nmf_bases, pad=pad)


def is_part(module: nn.Module) -> bool:
  """Whether a module called inside SegNeXt.apply is one of its parts (staged.py compiles each
  kind once): every module the backbone calls (stem, patch embeds, blocks, stage norms) and the
  head. Parts take arrays, a `Padding` and static flags; between them the forward is only glue."""
  return isinstance(module.parent, MSCAN) or (
      isinstance(module, LightHamHead) and isinstance(module.parent, SegNeXt))


def segnext(variant: str = "t", **overrides: Any) -> SegNeXt:
  """Build a SegNeXt of a paper variant ('t', 's', 'b', 'l'); keyword overrides win."""
  key = variant.lower()
  if key not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}  # JSON's
  return SegNeXt(**{**VARIANTS[key], **overrides})


def init_variables(model: SegNeXt, key: jax.Array, image_size: tuple[int, int] = (64, 64)) -> dict:
  """Random `{'params', 'batch_stats', 'nmf_bases'}` for `model` (shapes do not depend on
  image_size; 'nmf_bases' are the fixed inference bases drawn from `key`)."""
  k1, k2 = jax.random.split(key)
  try:
    init = _init_program(model, tuple(image_size))
  except TypeError:  # a module with unhashable attributes (lists): not kept
    init = _init_program.__wrapped__(model, tuple(image_size))
  return dict(init(k1, k2))


@functools.lru_cache(maxsize=16)
def _init_program(model: SegNeXt, image_size: tuple[int, int]):
  """The jitted init of `model` (kept per process: a second init traces nothing)."""
  x = jnp.zeros((1, *image_size, 3), jnp.float32)
  # The same variables from a smaller program: one grouped conv per depthwise conv, where 'shift'
  # has a slice per tap.
  fast = model.clone(dw_impl="lax", remat=False)
  return jax.jit(lambda a, b: fast.init({"params": a, "nmf": b}, x, train=False))


def fixed_bases(model: SegNeXt, seed: int) -> dict:
  """The 'nmf_bases' collection for `model`, drawn from `seed` as mmseg draws bases (C, R)."""
  from segnext_jax.ham_head import FIXED_BASES, random_bases
  bases = random_bases(jax.random.key(seed), 1, model.head_channels, model.nmf_rank)[0]
  return {FIXED_BASES: {"decode_head": {"hamburger": {"bases": bases}}}}


def abstract_variables(model: SegNeXt) -> dict:
  """Shapes/dtypes of the model's variables without computing anything (jax.eval_shape)."""
  key = jax.random.key(0)
  fast = model.clone(dw_impl="lax", remat=False)  # same variables, fewer ops to trace (as above)
  return dict(jax.eval_shape(lambda: fast.init({"params": key, "nmf": key}, jnp.zeros((1, 64, 64, 3)))))
