"""Evaluation: metrics vs mmseg's IoUMetric, the test pipeline vs mmseg's EncoderDecoder, modes."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from segnext_jax import convert_map, segnext
from segnext_jax.data.datasets import Synthetic
from segnext_jax.data.transforms import normalize
from segnext_jax.eval_lib import (EvalConfig, Predictor, confusion_matrix, evaluate,
                                  metrics_from_confusion, resize_logits, keep_ratio_resize)
from segnext_jax.testing import TorchReference, _stub_mmcv_ops


def test_metrics_hand_made():
  label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
  m = metrics_from_confusion(confusion_matrix(pred, label, 5))
  # class 0: inter 1, union 3; class 1: 2 / 3; class 2: 1 / 2; class 3: never labelled nor
  # predicted on valid pixels (255 ignored) -> NaN, excluded; class 4 absent -> NaN.
  np.testing.assert_allclose(m["IoU"][:3], [1 / 3, 2 / 3, 1 / 2])
  assert np.isnan(m["IoU"][3]) and np.isnan(m["IoU"][4])
  assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
  assert m["aAcc"] == pytest.approx(4 / 6)
  np.testing.assert_allclose(m["Acc"][:3], [1 / 2, 1.0, 1 / 2])


def test_metrics_match_mmseg_iou_metric_on_random_data():
  _stub_mmcv_ops()
  from mmseg.evaluation.metrics import IoUMetric
  rng = np.random.default_rng(0)
  k = 7
  cm = np.zeros((k, k), np.int64)
  areas = [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
  for _ in range(5):
    label = rng.integers(0, k - 1, (31, 17))  # class k-1 never labelled
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, k - 2, (31, 17))  # classes k-2, k-1 never predicted
    cm += confusion_matrix(pred, label, k)
    for acc, new in zip(areas, IoUMetric.intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), k, 255)):
      acc += new
  ref = IoUMetric.total_area_to_metrics(*areas, ["mIoU"])
  ours = metrics_from_confusion(cm)
  np.testing.assert_allclose(ours["IoU"], np.asarray(ref["IoU"]), equal_nan=True)
  np.testing.assert_allclose(ours["Acc"], np.asarray(ref["Acc"]), equal_nan=True)
  assert ours["aAcc"] == pytest.approx(float(ref["aAcc"]))
  assert ours["mIoU"] == pytest.approx(float(np.nanmean(np.asarray(ref["IoU"]))))


@pytest.mark.parametrize("src,dst", [((7, 9), (20, 31)), ((40, 50), (13, 17)), ((16, 16), (16, 40))])
def test_logit_resize_matches_torch_bilinear(src, dst):
  x = np.random.default_rng(0).standard_normal((*src, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=dst,
                                        mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(resize_logits(x, dst), ref, atol=1e-5)


def test_image_resize_is_cv2_bilinear_not_antialiased():
  import cv2
  img = (np.random.default_rng(0).random((100, 80, 3)) * 255).astype(np.uint8)
  got = keep_ratio_resize(img, (64, 32))  # fit short side 32: a 2.5x downscale
  assert got.shape == (40, 32, 3)
  np.testing.assert_array_equal(got, cv2.resize(img, (32, 40), interpolation=cv2.INTER_LINEAR))
  aa = jax.image.resize(img.astype(np.float32), (40, 32, 3), "bilinear", antialias=True)
  assert np.abs(np.asarray(aa) - got).max() > 10  # the antialiased resize is a different image


def mmseg_segmentor(ref: TorchReference, mode: str, crop=None, stride=None):
  """mmseg's EncoderDecoder (data preprocessor pads to /32) holding the reference weights."""
  _stub_mmcv_ops()
  from mmseg.models.segmentors import EncoderDecoder
  from mmseg.utils import register_all_modules
  register_all_modules()
  from mmengine.config import ConfigDict
  test_cfg = ConfigDict(mode=mode) if mode == "whole" else ConfigDict(mode=mode, crop_size=crop, stride=stride)
  seg = EncoderDecoder(backbone=dict(type="MSCAN", embed_dims=[32, 64, 160, 256], mlp_ratios=[8, 8, 4, 4],
                                     depths=[3, 3, 5, 2], norm_cfg=dict(type="BN", requires_grad=True)),
                       decode_head=dict(type="LightHamHead", in_channels=[64, 160, 256], in_index=[1, 2, 3],
                                        channels=256, ham_channels=256, num_classes=150,
                                        norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
                                        align_corners=False,
                                        ham_kwargs=dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7,
                                                        inv_t=100, rand_init=True)),
                       data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                              std=[58.395, 57.12, 57.375], bgr_to_rgb=False, pad_val=0,
                                              seg_pad_val=255, test_cfg=dict(size_divisor=32)),
                       test_cfg=test_cfg)
  seg.backbone.load_state_dict(ref.backbone.state_dict())
  seg.decode_head.load_state_dict(ref.head.state_dict())
  return seg.eval()


def mmseg_predict(seg, resized: np.ndarray, ori_hw, bases: np.ndarray) -> np.ndarray:
  from mmseg.structures import SegDataSample
  b = torch.from_numpy(bases.copy())
  seg.decode_head.hamburger.ham._build_bases = lambda *a, **k: b.clone()
  sample = SegDataSample(metainfo=dict(ori_shape=ori_hw, img_shape=resized.shape[:2]))
  data = seg.data_preprocessor(dict(inputs=[torch.from_numpy(resized.transpose(2, 0, 1).copy())],
                                    data_samples=[sample]), False)
  with torch.no_grad():
    out = seg.predict(data["inputs"], data["data_samples"])
  return out[0].seg_logits.data.numpy().transpose(1, 2, 0)


@pytest.fixture(scope="module")
def converted_t(torch_ref_t):
  variables, _, _ = convert_map.convert_file(torch_ref_t.path)
  return segnext("t"), variables


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predictor_matches_mmseg_test_pipeline(torch_ref_t, converted_t, mode):
  model, variables = converted_t
  cfg = EvalConfig(scale=(200, 100), mode=mode, crop=(64, 64), stride=(48, 48))
  pred = Predictor(model, variables, cfg)
  img = (np.random.default_rng(0).random((83, 121, 3)) * 255).astype(np.uint8)
  ours = pred.predict(img, index=3)
  resized = keep_ratio_resize(img, cfg.scale)                 # mmseg's Resize(keep_ratio) is cv2 too
  seg = mmseg_segmentor(torch_ref_t, mode, crop=cfg.crop, stride=cfg.stride)
  ref = mmseg_predict(seg, resized, img.shape[:2], np.asarray(pred.bases([3])))
  assert ours.shape == ref.shape == (83, 121, 150)
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_tta_is_flip_equivariant_probabilities(converted_t):
  model, variables = converted_t
  pred = Predictor(model, variables, EvalConfig(scale=(96, 48), tta=True))
  img = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
  a = pred.predict(img, 0)
  b = pred.predict(np.ascontiguousarray(img[:, ::-1]), 0)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(a, b[:, ::-1], atol=1e-5)


class VariedSizes:
  """Synthetic images resized to several sizes (as ADE20K's validation images vary)."""
  num_classes = 6
  class_names = Synthetic.class_names

  def __init__(self, n):
    self.base = Synthetic(length=n, size=64, split="val")
    self.sizes = [(64, 64), (60, 90), (70, 50), (64, 96), (61, 91)]

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    import cv2
    img, lbl = self.base[i]
    h, w = self.sizes[i % len(self.sizes)]
    return (cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(lbl, (w, h), interpolation=cv2.INTER_NEAREST))


def test_evaluate_is_deterministic_batched_and_compiles_per_shape(t_variables):
  variables = jax.tree.map(np.asarray, t_variables)
  variables["params"]["decode_head"] = {**variables["params"]["decode_head"]}
  model = segnext("t")
  k = 6
  variables["params"]["decode_head"]["conv_seg"] = {
      "kernel": np.random.default_rng(0).normal(0, 0.05, (1, 1, 256, k)).astype(np.float32),
      "bias": np.zeros(k, np.float32)}
  model = segnext("t", num_classes=k)
  ds = VariedSizes(11)
  cfg = EvalConfig(scale=(128, 64), batch_size=2)
  p1 = Predictor(model, variables, cfg)
  r1 = evaluate(p1, ds, progress=False)
  r2 = evaluate(Predictor(model, variables, cfg), ds, progress=False)
  np.testing.assert_array_equal(r1["confusion"], r2["confusion"])
  assert r1["confusion"].sum() == sum(int((ds[i][1] != 255).sum()) for i in range(len(ds)))
  shapes = {p1.prepare(ds[i][0])[0].shape for i in range(len(ds))}
  # one program per (padded shape, power-of-two batch <= 2)
  assert len(shapes) <= p1.logits_fn._cache_size() <= 2 * len(shapes) and len(shapes) < len(ds)
  single = Predictor(model, variables, EvalConfig(scale=(128, 64), batch_size=1))
  for i in (0, 7):  # batching does not change an image's prediction
    img, _ = ds[i]
    x, valid = p1.prepare(img)
    from segnext_jax.eval_lib import postprocess
    batched = postprocess(p1.run(np.stack([x, np.zeros_like(x)]), [i, 0])[0], valid, img.shape[:2])
    np.testing.assert_allclose(batched, single.predict(img, i), atol=1e-5)
  r3 = evaluate(Predictor(model, variables, EvalConfig(scale=(128, 64), nmf_seed=5)), ds, progress=False)
  assert r3["images"] == 11
