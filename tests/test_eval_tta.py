"""Multi-scale + flip test-time augmentation, both pipelines, against mmseg's own objects.

mmseg1: the ADE20K config's `tta_pipeline` (mmseg's transforms, from the installed wheel) and
`SegTTAModel` around an `EncoderDecoder` holding the reference weights, on a real ADE20K image.
official: mmseg 0.x is not installed; its views are built here directly (MultiScaleFlipAug's
bounds, mmcv.imrescale, mmcv.imresize_to_multiple) and each is run through the EncoderDecoder.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mmseg_eval import ADE_VAL3, ade20k_config, fixed_bases, iou_metric, predict_view, segmentor
from segnext_jax.mmseg_reference import fix_nmf_bases, stub_mmcv_ops
from segnext_jax import segnext, torch_io
from segnext_jax.data.transforms import reduce_zero_label
from segnext_jax.eval import (TTA_RATIOS, InferenceConfig, Segmenter, confusion_matrix,
                              metrics_from_confusion, views)

PROB_ATOL = 1e-4  # mean class probabilities, float32 whole network (logits agree to 1e-4)
SIZES = [(512, 683), (364, 500), (300, 400), (75, 100), (427, 640), (1, 7), (333, 333), (641, 97)]


@pytest.fixture(scope="module")
def converted(torch_ref_t):
  """The reference T converted; lax depthwise convs (same numbers, several times faster to compile)."""
  variables, _, _ = torch_io.convert_file(torch_ref_t.path)
  return segnext("t", dw_impl="lax"), variables


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory):
  """ADE_val_00000003 (300x400) reduced 4x, as image/annotation PNGs: small views, fast test."""
  out = tmp_path_factory.mktemp("ade_small")
  img = cv2.imread(str(ADE_VAL3 / "images/validation/ADE_val_00000003.jpg"), cv2.IMREAD_COLOR)
  ann = cv2.imread(str(ADE_VAL3 / "annotations/validation/ADE_val_00000003.png"), cv2.IMREAD_GRAYSCALE)
  cv2.imwrite(str(out / "img.png"), cv2.resize(img, (100, 75), interpolation=cv2.INTER_AREA))
  cv2.imwrite(str(out / "ann.png"), cv2.resize(ann, (100, 75), interpolation=cv2.INTER_NEAREST))
  rgb = cv2.imread(str(out / "img.png"), cv2.IMREAD_COLOR)[..., ::-1]
  label = reduce_zero_label(cv2.imread(str(out / "ann.png"), cv2.IMREAD_GRAYSCALE))
  return out, np.ascontiguousarray(rgb), label


def mmseg_transforms(cfg_list):
  stub_mmcv_ops()
  from mmseg.registry import TRANSFORMS
  from mmseg.utils import register_all_modules
  register_all_modules()
  return [TRANSFORMS.build(t) for t in cfg_list]


def test_mmseg1_tta_sizes_are_mmcv_resize_with_scale_factor():
  """The config's Resize(scale_factor=r, keep_ratio=True) of the original (mmcv rounds twice)."""
  resizes = mmseg_transforms(ade20k_config().tta_pipeline[1]["transforms"][0])
  assert [t.scale_factor for t in resizes] == [(r, r) for r in TTA_RATIOS]
  for hw in SIZES:
    ours = [v.size for v in views(hw, "mmseg1", (2048, 512), tta=True)]
    theirs = [t.transform({"img": np.zeros((*hw, 3), np.uint8)})["img"].shape[:2] for t in resizes]
    assert ours[::2] == ours[1::2] == theirs, hw
    assert all(v.resize_to is None for v in views(hw, "mmseg1", (2048, 512), tta=True))


def official_views_numpy(img: np.ndarray, scale, ratios, flip: bool = True):
  """mmseg 0.x MultiScaleFlipAug(img_scale=scale, img_ratios=ratios, flip) with the SegNeXt
  repository's transforms: Resize(keep_ratio) = mmcv.imrescale to the bound (int(s0 r), int(s1 r)),
  ResizeToMultiple(32) = mmcv.imresize_to_multiple(scale_factor=1), RandomFlip. [(view, flip)]."""
  import mmcv
  out = []
  for r in ratios:
    bound = (int(scale[0] * r), int(scale[1] * r))
    h, w = img.shape[:2]
    f = min(max(bound) / max(h, w), min(bound) / min(h, w))
    size = (int(h * f + 0.5), int(w * f + 0.5))
    first = mmcv.imrescale(img, bound)
    assert first.shape[:2] == size
    second = mmcv.imresize_to_multiple(first, 32, scale_factor=1)
    assert second.shape[:2] == (int(np.ceil(size[0] / 32)) * 32, int(np.ceil(size[1] / 32)) * 32)
    out += [(second, False)] + ([(np.ascontiguousarray(second[:, ::-1]), True)] if flip else [])
  return out


@pytest.mark.parametrize("tta", [False, True])
def test_official_views_are_multiscaleflipaug_with_resize_to_multiple(tta):
  rng = np.random.default_rng(0)
  for hw in SIZES[:5]:
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    ratios = TTA_RATIOS if tta else (1.0,)
    ref = official_views_numpy(img, (2048, 512), ratios, flip=tta)
    ours = views(hw, "official", (2048, 512), tta=tta)
    assert len(ours) == len(ref)
    for view, (pixels, flip) in zip(ours, ref):
      prepared = InferenceConfig().prepare(img, view)
      assert view.flip == flip and prepared.size == pixels.shape[:2] == prepared.padded  # no padding
      np.testing.assert_allclose(prepared.pixels, (pixels - np.float32([123.675, 116.28, 103.53]))
                                 / np.float32([58.395, 57.12, 57.375]), atol=1e-6)


class RecordingTTA:
  """mmseg's SegTTAModel, keeping each view's seg_logits (at the original size) for comparison."""

  def __new__(cls, module):
    from mmseg.models.segmentors import SegTTAModel

    class Recording(SegTTAModel):
      def merge_preds(self, data_samples_list):
        self.view_logits = [s.seg_logits.data.clone() for s in data_samples_list[0]]
        return super().merge_preds(data_samples_list)
    return Recording(module=module)


def test_tta_mmseg1_matches_seg_tta_model(torch_ref_t, converted, small_ade):
  folder, img, label = small_ade
  model, variables = converted
  from mmengine.dataset import pseudo_collate
  results = {"img_path": str(folder / "img.png"), "seg_map_path": str(folder / "ann.png"),
             "reduce_zero_label": True, "seg_fields": []}
  for t in mmseg_transforms(ade20k_config().tta_pipeline):
    results = t(results)
  assert len(results["inputs"]) == 2 * len(TTA_RATIOS)
  seg = segmentor(torch_ref_t, bgr_to_rgb=True)  # LoadImageFromFile gives BGR, as in the config
  fix_nmf_bases(seg.decode_head, fixed_bases(variables))
  tta = RecordingTTA(seg)
  with torch.no_grad():
    (merged,) = tta.test_step(pseudo_collate([results]))
  ref_prob = torch.stack([v.softmax(0) for v in tta.view_logits]).mean(0).numpy().transpose(1, 2, 0)
  ref_pred = merged.pred_sem_seg.data[0].numpy()
  np.testing.assert_array_equal(merged.gt_sem_seg.data[0].numpy(), label)

  pred = Segmenter.for_model(model, InferenceConfig(tta=True))
  prob = pred.scores(variables, img)
  err = np.abs(prob - ref_prob).max()
  print(f"mmseg1 TTA: max |mean prob - SegTTAModel's| = {err:.2e}")
  assert err <= PROB_ATOL, err
  classes = pred.classes(variables, img)
  np.testing.assert_array_equal(classes, ref_pred)
  assert_metrics_match(classes, ref_pred, label)


def test_tta_official_matches_encoder_decoder_views(torch_ref_t, converted, small_ade):
  """0.x aug_test: each view's softmax at the original size (flip undone), averaged."""
  _, img, label = small_ade
  model, variables = converted
  scale = (256, 64)  # a smaller bound than ADE20K's (2048, 512): small views for a fast test
  seg = segmentor(torch_ref_t)
  fix_nmf_bases(seg.decode_head, fixed_bases(variables))
  probs = [torch.from_numpy(predict_view(seg, view, img.shape[:2], flip)).softmax(-1)
           for view, flip in official_views_numpy(img, scale, TTA_RATIOS)]
  ref_prob = torch.stack(probs).mean(0).numpy()

  pred = Segmenter.for_model(model, InferenceConfig(pipeline="official", tta=True, scale=scale))
  prob = pred.scores(variables, img)
  err = np.abs(prob - ref_prob).max()
  print(f"official TTA: max |mean prob - EncoderDecoder views'| = {err:.2e}")
  assert err <= PROB_ATOL, err
  classes = pred.classes(variables, img)
  np.testing.assert_array_equal(classes, ref_prob.argmax(-1))
  assert_metrics_match(classes, ref_prob.argmax(-1), label)


def assert_metrics_match(ours: np.ndarray, theirs: np.ndarray, label: np.ndarray) -> None:
  mine = metrics_from_confusion(confusion_matrix(ours, label, 150))
  ref = iou_metric([(torch.from_numpy(theirs.astype(np.int64)), torch.from_numpy(label))])
  np.testing.assert_allclose(mine["IoU"], np.asarray(ref["IoU"]), equal_nan=True)
  np.testing.assert_allclose(mine["Acc"], np.asarray(ref["Acc"]), equal_nan=True)
  assert mine["aAcc"] == pytest.approx(float(ref["aAcc"]))
