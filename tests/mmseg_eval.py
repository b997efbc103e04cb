"""mmseg 1.x's own test-time objects around a TorchReference: EncoderDecoder, SegTTAModel, the
ADE20K config's pipelines, and our fixed NMF bases injected into them (eval tests only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segnext_jax.model import VARIANTS
from segnext_jax.mmseg_reference import TorchReference, stub_mmcv_ops

ADE_VAL3 = Path(__file__).parent / "data" / "ade20k_val3"


def fixed_bases(variables: dict) -> np.ndarray:
  """The (C, R) inference bases stored in our variables."""
  return np.asarray(variables["nmf_bases"]["decode_head"]["hamburger"]["bases"])


def segmentor(ref: TorchReference, mode: str = "whole", crop=None, stride=None,
              bgr_to_rgb: bool = False):
  """mmseg's EncoderDecoder (SegDataPreProcessor pads to /32) holding the reference weights."""
  stub_mmcv_ops()
  from mmengine.config import ConfigDict
  from mmseg.models.segmentors import EncoderDecoder
  from mmseg.utils import register_all_modules
  register_all_modules()
  row = VARIANTS[ref.variant]
  ch = row["head_channels"]
  test_cfg = ConfigDict(mode=mode) if mode == "whole" else ConfigDict(mode=mode, crop_size=crop,
                                                                      stride=stride)
  seg = EncoderDecoder(
      backbone=dict(type="MSCAN", embed_dims=list(row["embed_dims"]), mlp_ratios=[8, 8, 4, 4],
                    depths=list(row["depths"]), norm_cfg=dict(type="BN", requires_grad=True)),
      decode_head=dict(type="LightHamHead", in_channels=list(row["embed_dims"][1:]),
                       in_index=[1, 2, 3], channels=ch, ham_channels=ch, num_classes=150,
                       norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
                       align_corners=False,
                       ham_kwargs=dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7, inv_t=100,
                                       rand_init=True)),
      data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                             std=[58.395, 57.12, 57.375], bgr_to_rgb=bgr_to_rgb, pad_val=0,
                             seg_pad_val=255, test_cfg=dict(size_divisor=32)),
      test_cfg=test_cfg)
  seg.backbone.load_state_dict(ref.backbone.state_dict())
  seg.decode_head.load_state_dict(ref.head.state_dict())
  return seg.eval()


def predict_view(seg, view: np.ndarray, ori_hw, flip: bool = False) -> np.ndarray:
  """EncoderDecoder.test_step on one resized (and flipped) uint8 view: (H, W, K) seg_logits at
  ori_hw (padding cropped, flip undone, bilinear resize: its postprocess_result)."""
  from mmseg.structures import SegDataSample
  meta = dict(ori_shape=tuple(ori_hw), img_shape=view.shape[:2], flip=flip,
              flip_direction="horizontal" if flip else None)
  data = dict(inputs=[torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1)))],
              data_samples=[SegDataSample(metainfo=meta)])
  with torch.no_grad():
    out = seg.test_step(data)
  return out[0].seg_logits.data.numpy().transpose(1, 2, 0)


def ade20k_config():
  """mmseg 1.x's ADE20K dataset config, as shipped in the installed wheel."""
  stub_mmcv_ops()
  import mmseg
  from mmengine.config import Config
  return Config.fromfile(str(Path(mmseg.__file__).parent / ".mim/configs/_base_/datasets/ade20k.py"))


def iou_metric(pairs, num_classes: int = 150) -> dict:
  """mmseg's IoUMetric over (pred, label) torch pairs."""
  stub_mmcv_ops()
  from mmseg.evaluation.metrics import IoUMetric
  areas = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
  for pred, label in pairs:
    for acc, new in zip(areas, IoUMetric.intersect_and_union(pred, label, num_classes, 255)):
      acc += new
  return IoUMetric.total_area_to_metrics(*areas, ["mIoU"])
