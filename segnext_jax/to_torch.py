"""A segnext-jax checkpoint (converted or train.py) as an mmseg 1.x segmentor .pth.

The file is {'meta', 'state_dict'} with mmseg 1.x EncoderDecoder keys (backbone.*, decode_head.*),
made by the importer's own key tables inverted (convert_map.export_state_dict). meta['cfg'] is an
mmseg model config (its ham_kwargs carry the NMF rank, which no tensor shape shows) and
meta['segnext_jax'] holds the rank and the fixed NMF inference bases (C, R).
"""
from __future__ import annotations

import pprint
from pathlib import Path
from typing import Any

import numpy as np

from segnext_jax import checkpoint, convert_map
from segnext_jax.data.transforms import MEAN, STD
from segnext_jax.errors import optional
from segnext_jax.ham_head import FIXED_BASES
from segnext_jax.model import SegNeXt


def mmseg_model_config(model: SegNeXt) -> dict[str, Any]:
  """The mmseg 1.x `model = dict(...)` config of a SegNeXt (configs/segnext/*.py, 1 GPU)."""
  dims = list(model.embed_dims)
  mean, std = (a.astype(float).round(3).tolist() for a in (MEAN, STD))
  return dict(
      type="EncoderDecoder",
      data_preprocessor=dict(type="SegDataPreProcessor", mean=mean, std=std, bgr_to_rgb=True,
                             pad_val=0, seg_pad_val=255),
      backbone=dict(type="MSCAN", embed_dims=dims, mlp_ratios=list(model.mlp_ratios), drop_rate=0.0,
                    drop_path_rate=model.drop_path, depths=list(model.depths),
                    attention_kernel_sizes=[5, [1, 7], [1, 11], [1, 21]],
                    attention_kernel_paddings=[2, [0, 3], [0, 5], [0, 10]],
                    act_cfg=dict(type="GELU"), norm_cfg=dict(type="BN", requires_grad=True)),
      decode_head=dict(type="LightHamHead", in_channels=dims[1:], in_index=[1, 2, 3],
                       channels=model.head_channels, ham_channels=model.head_channels,
                       dropout_ratio=model.dropout, num_classes=model.num_classes,
                       norm_cfg=dict(type="GN", num_groups=32, requires_grad=True), align_corners=False,
                       loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                       ham_kwargs=dict(MD_S=1, MD_R=model.nmf_rank, train_steps=6, eval_steps=7,
                                       inv_t=100, rand_init=True)),
      train_cfg=dict(), test_cfg=dict(mode="whole"))


def torch_meta(model: SegNeXt, variables: dict, meta: dict[str, Any], step: int | None) -> dict:
  """mmengine-style meta: cfg text (the segmentor, or the MSCAN of a backbone-only checkpoint),
  dataset_meta (if known) and our NMF rank and bases."""
  import torch
  bases = variables.get(FIXED_BASES, {}).get("decode_head", {}).get("hamburger", {}).get("bases")
  ours = dict(variant=meta["variant"], model=meta.get("model", {}), nmf_rank=model.nmf_rank,
              nmf_bases=None if bases is None else torch.from_numpy(np.array(bases, np.float32)),
              nmf_bases_source=meta.get("nmf_bases"), step=step,
              num_batches_tracked=f"written as {convert_map.NUM_BATCHES_TRACKED} = 0 (not stored)")
  cfg = mmseg_model_config(model)
  name, cfg = ("backbone", cfg["backbone"]) if meta.get("backbone_only") else ("model", cfg)
  out = dict(cfg=f"{name} = " + pprint.pformat(cfg, sort_dicts=False), segnext_jax=ours)
  if meta.get("class_names"):
    out["dataset_meta"] = dict(classes=tuple(meta["class_names"]),
                               palette=[list(p) for p in meta.get("palette", [])])
  return out


def export_checkpoint(ckpt_dir: str | Path, out: str | Path, step: int | None = None) -> dict:
  """Load DIR (latest step, or `step`) and write its mmseg .pth; returns the written object."""
  torch = optional("torch", "convert", "writing an mmseg .pth")
  found = checkpoint.locate(ckpt_dir, step)  # a path, a workdir or a released model's name
  model, variables, meta = checkpoint.load_located(found, backbone_only_ok=True)
  step = found.step
  sd = convert_map.export_state_dict(variables, backbone_only=bool(meta.get("backbone_only")))
  obj = dict(meta=torch_meta(model, variables, meta, step),
             state_dict={k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  torch.save(obj, out)
  return obj
