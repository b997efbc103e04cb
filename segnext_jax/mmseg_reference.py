"""mmsegmentation's own torch SegNeXt as a reference, with random non-trivial weights: what the parity
tests and the benchmarks compare against.

Needs the dev extra (torch, mmcv-lite, mmengine, mmsegmentation); imported lazily.
"""
from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np


def stub_mmcv_ops() -> None:
  """mmcv-lite has no compiled ops; SegNeXt never calls them, but `import mmseg.models` imports them."""
  if "mmcv.ops" in sys.modules:
    return
  ops = types.ModuleType("mmcv.ops")

  def _missing(*args, **kwargs):
    raise RuntimeError("mmcv.ops is stubbed in segnext-jax tests")

  def _getattr(name: str):  # any `from mmcv.ops import X` gets a failing callable
    if name.startswith("__"):
      raise AttributeError(name)
    return _missing

  ops.__getattr__ = _getattr
  ops.__file__ = __file__
  sys.modules["mmcv.ops"] = ops


def mmseg_segmentor_modules(variant: str, num_classes: int = 150, nmf_rank: int = 16,
                            **overrides: Any):
  """mmseg's own MSCAN and LightHamHead for a variant, from the config shipped in the wheel.
  overrides (embed_dims, depths, head_channels, drop_path) replace the variant's row, as
  segnext(variant, **overrides) does: a custom-size checkpoint in mmseg's own layout."""
  stub_mmcv_ops()
  import torch  # noqa: F401
  from mmseg.models.backbones.mscan import MSCAN
  from mmseg.models.decode_heads.ham_head import LightHamHead
  from segnext_jax.model import MLP_RATIOS, VARIANTS
  if unknown := set(overrides) - set(VARIANTS[variant]):
    raise ValueError(f"unknown mmseg reference overrides {sorted(unknown)}; expected some of "
                     f"{sorted(VARIANTS[variant])}")
  row = {**VARIANTS[variant], **overrides}
  backbone = MSCAN(embed_dims=list(row["embed_dims"]), mlp_ratios=list(MLP_RATIOS),
                   drop_rate=0.0, drop_path_rate=row["drop_path"], depths=list(row["depths"]),
                   norm_cfg=dict(type="BN", requires_grad=True))
  head = LightHamHead(in_channels=list(row["embed_dims"][1:]), in_index=[1, 2, 3],
                      channels=row["head_channels"], ham_channels=row["head_channels"],
                      dropout_ratio=0.1, num_classes=num_classes,
                      norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
                      align_corners=False,
                      loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                      ham_kwargs=dict(MD_S=1, MD_R=nmf_rank, train_steps=6, eval_steps=7,
                                      inv_t=100, rand_init=True))
  return backbone, head


def randomize_(module, seed: int) -> None:
  """Non-trivial weights everywhere: BN running stats, affine params and layer scales (default
  init would hide mapping bugs: BN = identity, layer scale 1e-2)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "layer_scale" in name:
        p.copy_(0.1 + 0.3 * torch.rand(p.shape, generator=g))  # trained MSCANs: O(0.1)
      elif name.endswith("weight") and p.ndim == 1:  # BN / GN / LN scale
        p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:  # conv kernels: fan-in scaled so activations stay O(1)
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def calibrate_bn_(backbone, seed: int, size: int = 96) -> None:
  """Set BN running stats to the batch stats of a random input (torch momentum 1.0), so that
  eval-mode activations stay O(1) through deep random stacks, as in a trained network."""
  import torch
  bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  saved = [m.momentum for m in bns]
  for m in bns:
    m.momentum = 1.0
  for m in backbone.modules():
    if hasattr(m, "drop_prob"):
      m.drop_prob = 0.0
  g = torch.Generator().manual_seed(seed)
  backbone.train()
  with torch.no_grad():
    backbone(torch.randn((2, 3, size, size), generator=g))
  backbone.eval()
  for m, mom in zip(bns, saved):
    m.momentum = mom


def segmentor_state_dict(backbone, head) -> dict:
  """mmseg EncoderDecoder key layout: backbone.* and decode_head.*."""
  sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
  sd.update({f"decode_head.{k}": v for k, v in head.state_dict().items()})
  return sd


def fix_nmf_bases(head, bases) -> None:
  """Start `head`'s (an mmseg LightHamHead's) NMF from `bases`, not from torch.rand: (C, R) for
  every image, as our fixed-bases inference does, or (B, C, R) one per image (MD_S = 1).
  The one way the tests and benchmarks give mmseg the NMF bases they give JAX."""
  import torch
  b = bases if isinstance(bases, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(bases))
  if b.ndim not in (2, 3):
    raise ValueError(f"NMF bases of shape {tuple(b.shape)}: expected (C, R) or (B, C, R)")

  def build(B: int, S: int, D: int, R: int, device=None):  # NMF2D._build_bases' signature
    want = (B * S, D, R)
    if tuple(b.shape) not in (want, want[1:]):
      raise ValueError(f"NMF bases of shape {tuple(b.shape)} for a batch that needs {want}")
    return (b if b.ndim == 3 else b[None].expand(*want)).clone()
  head.hamburger.ham._build_bases = build


class TorchReference:
  """A random-weight mmseg SegNeXt written to a real .pth in mmseg's checkpoint format."""

  def __init__(self, variant: str, tmp_path, seed: int = 0, num_classes: int = 150,
               **overrides: Any):
    """overrides: a custom size (e.g. embed_dims, depths, head_channels), see
    `mmseg_segmentor_modules`; the file is then segnext_<variant>_custom.pth."""
    import torch
    self.variant = variant
    self.overrides = overrides
    self.backbone, self.head = mmseg_segmentor_modules(variant, num_classes, **overrides)
    randomize_(self.backbone, seed)
    calibrate_bn_(self.backbone, seed)
    randomize_(self.head, seed + 1)
    self.backbone.eval()
    self.head.eval()
    self.path = tmp_path / f"segnext_{variant}{'_custom' if overrides else ''}.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"},
                "state_dict": segmentor_state_dict(self.backbone, self.head)}, self.path)

  def forward(self, images_nhwc: np.ndarray, bases: np.ndarray):
    """(stage maps NHWC, stride-8 logits NHWC) with the given NMF bases (B, C, R)."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    fix_nmf_bases(self.head, bases)
    with torch.no_grad():
      feats = self.backbone(x)
      logits = self.head(feats)
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return [to_nhwc(f) for f in feats], to_nhwc(logits)


def train_mode_copies(backbone, head, dtype=None):
  """Deep copies of the reference's backbone and head in training mode with DropPath and
  Dropout2d off (deterministic), optionally cast (e.g. torch.float64)."""
  import copy
  backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
  if dtype is not None:
    backbone, head = backbone.to(dtype), head.to(dtype)
  for m in backbone.modules():
    if hasattr(m, "drop_prob"):
      m.drop_prob = 0.0
  head.dropout = None
  backbone.train()
  head.train()
  return backbone, head
