"""Evaluation: metrics vs mmseg's IoUMetric, the test pipeline vs mmseg's EncoderDecoder, modes."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from conftest import TINY, xla_programs
from mmseg_eval import fixed_bases, iou_metric, predict_view, segmentor
from segnext_jax.mmseg_reference import fix_nmf_bases
from segnext_jax import segnext, torch_io
from segnext_jax.data.transforms import rescale_size, resize_image
from segnext_jax.eval import (CompiledForward, InferenceConfig, Segmenter, View, confusion_matrix,
                              evaluate, metrics_from_confusion, to_original)
from segnext_jax.eval.views import ceil_to


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
  rng = np.random.default_rng(0)
  k = 7
  cm = np.zeros((k, k), np.int64)
  pairs = []
  for _ in range(5):
    label = rng.integers(0, k - 1, (31, 17))  # class k-1 never labelled
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, k - 2, (31, 17))  # classes k-2, k-1 never predicted
    cm += confusion_matrix(pred, label, k)
    pairs.append((torch.from_numpy(pred), torch.from_numpy(label)))
  ref = iou_metric(pairs, k)
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
  got = to_original(x, src, dst)
  assert got.shape == (*dst, 3)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_image_resize_is_cv2_bilinear_not_antialiased():
  import cv2
  img = (np.random.default_rng(0).random((100, 80, 3)) * 255).astype(np.uint8)
  got = resize_image(img, rescale_size(img.shape[:2], (64, 32)))  # fit short side 32: 2.5x down
  assert got.shape == (40, 32, 3)
  np.testing.assert_array_equal(got, cv2.resize(img, (32, 40), interpolation=cv2.INTER_LINEAR))
  aa = jax.image.resize(img.astype(np.float32), (40, 32, 3), "bilinear", antialias=True)
  assert np.abs(np.asarray(aa) - got).max() > 10  # the antialiased resize is a different image


@pytest.fixture(scope="module")
def converted_t(torch_ref_t):
  variables, _, _ = torch_io.convert_file(torch_ref_t.path)
  return segnext("t"), variables


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predictor_matches_mmseg_test_pipeline(torch_ref_t, converted_t, mode):
  model, variables = converted_t
  cfg = InferenceConfig(scale=(200, 100), mode=mode, crop=(64, 64), stride=(48, 48))
  img = (np.random.default_rng(0).random((83, 121, 3)) * 255).astype(np.uint8)
  ours = Segmenter.for_model(model, cfg).scores(variables, img)
  resized = resize_image(img, rescale_size(img.shape[:2], cfg.scale))  # mmseg's Resize: cv2 too
  seg = segmentor(torch_ref_t, mode, crop=cfg.crop, stride=cfg.stride)
  fix_nmf_bases(seg.decode_head, fixed_bases(variables))
  ref = predict_view(seg, resized, img.shape[:2])
  assert ours.shape == ref.shape == (83, 121, 150)
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_inferencer_gives_mmseg_seg_logits(torch_ref_t, converted_t, tmp_path):
  """segnext_jax.Inferencer on the converted parity checkpoint: mmseg's seg_logits (its
  inference_model) at the image's size; its class map is their argmax."""
  from segnext_jax import Inferencer, checkpoint
  _, variables = converted_t
  _, meta, _ = torch_io.convert_file(torch_ref_t.path)
  seg = Inferencer(checkpoint.save_converted(tmp_path / "t", variables, meta), "whole",
                   scale=(200, 100))
  img = (np.random.default_rng(0).random((83, 121, 3)) * 255).astype(np.uint8)
  ours = seg.logits(img)
  mm = segmentor(torch_ref_t)
  fix_nmf_bases(mm.decode_head, fixed_bases(variables))
  ref = predict_view(mm, resize_image(img, rescale_size(img.shape[:2], (200, 100))), img.shape[:2])
  assert ours.shape == ref.shape == (83, 121, 150)
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
  np.testing.assert_array_equal(seg(img), ours.argmax(-1))


def test_flipped_view_matches_mmseg_postprocess(torch_ref_t, converted_t):
  """A flipped view: mmseg crops the padding, flips back, resizes; so do we (by gather indices),
  from the stride-8 logits of the view run on its canvas."""
  model, variables = converted_t
  img = (np.random.default_rng(2).random((45, 70, 3)) * 255).astype(np.uint8)
  view = View((50, 78), flip=True)
  prepared = InferenceConfig().prepare(img, view)
  assert prepared.size == (50, 78) and prepared.padded == prepared.canvas == (64, 96)
  logits = Segmenter.for_model(model).run(variables, [prepared])[0]
  assert logits.shape[:2] == (64 // 8, 96 // 8)  # /32 input 64x96 (also its canvas)
  ours = to_original(logits, prepared.size, img.shape[:2], flip=True, padded=prepared.padded)
  seg = segmentor(torch_ref_t)
  fix_nmf_bases(seg.decode_head, fixed_bases(variables))
  ref = predict_view(seg, resize_image(img, view.size)[:, ::-1], img.shape[:2], flip=True)
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


class VariedSizes:
  """Random-blob images of several sizes (as ADE20K's validation images vary)."""
  num_classes = 6
  class_names = [str(i) for i in range(6)]
  sizes = [(64, 64), (60, 90), (70, 50), (64, 96), (61, 91)]

  def __init__(self, n: int, order=None):
    self.order = list(range(n)) if order is None else list(order)

  def __len__(self):
    return len(self.order)

  def __getitem__(self, i):
    import cv2
    j = self.order[i]
    rng = np.random.default_rng(j)
    h, w = self.sizes[j % len(self.sizes)]
    label = cv2.resize(rng.integers(0, 6, (4, 4)).astype(np.uint8), (w, h),
                       interpolation=cv2.INTER_NEAREST)
    img = (label[..., None] * 40 + rng.integers(0, 30, (h, w, 3))).astype(np.uint8)
    return img, label


def six_class_model(tiny_variables):
  """The TINY model with a 6-class classifier whose logits are O(1)."""
  model = segnext("t", **TINY, num_classes=6)
  variables = jax.tree.map(np.asarray, dict(tiny_variables))
  variables["params"] = {**variables["params"]}
  variables["params"]["decode_head"] = {**variables["params"]["decode_head"], "conv_seg": {
      "kernel": np.random.default_rng(0).normal(0, 0.05, (1, 1, model.head_channels, 6)).astype(np.float32),
      "bias": np.zeros(6, np.float32)}}
  return model, variables


def counting(model, shapes: list):
  """The model's inference apply, recording the input shape of every trace (= every compile)."""
  def apply(variables, images, valid=None):
    shapes.append(images.shape)
    return model.apply(variables, images, train=False, valid=valid)
  return apply


def counting_segmenter(model, cfg: InferenceConfig, traced: list, **kwargs) -> Segmenter:
  """A Segmenter on canvases whose forward records the input shape of every trace."""
  return Segmenter(CompiledForward(jax.jit(counting(model, traced)), cfg, **kwargs), cfg)


def test_evaluate_is_deterministic_batched_and_compiles_per_canvas(tiny_variables):
  model, variables = six_class_model(tiny_variables)
  ds = VariedSizes(11)
  traced = []
  cfg = InferenceConfig(scale=(128, 64), batch_size=2)
  seg = counting_segmenter(model, cfg, traced)
  r1 = evaluate(seg, variables, ds, progress=False)
  n_traced = len(traced)
  r2 = evaluate(seg, variables, VariedSizes(11, order=reversed(range(11))), progress=False)
  assert len(traced) == n_traced  # the second evaluation reuses every program
  np.testing.assert_array_equal(r1["confusion"], r2["confusion"])
  assert r1["confusion"].sum() == sum(int((ds[i][1] != 255).sum()) for i in range(len(ds)))
  canvases = {cfg.prepare(img, *cfg.views(img.shape[:2])).canvas
              for img, _ in (ds[i] for i in range(len(ds)))}
  # one program per canvas, at the one batch size (leftovers padded with filler images)
  assert sorted(traced) == sorted((2, *c, 3) for c in canvases) and len(canvases) < len(ds)
  single = Segmenter.for_model(model, dataclasses.replace(cfg, batch_size=1))
  r3 = evaluate(single, variables, ds, progress=False)
  np.testing.assert_array_equal(r1["confusion"], r3["confusion"])  # batching changes nothing
  for i in (0, 7):
    img, _ = ds[i]
    (view,) = cfg.views(img.shape[:2])
    prepared = cfg.prepare(img, view)
    filler = dataclasses.replace(prepared, pixels=np.zeros_like(prepared.pixels))
    logits = seg.run(variables, [prepared, filler])  # with a filler image on one canvas
    batched = to_original(logits[0], prepared.size, img.shape[:2], padded=prepared.padded)
    np.testing.assert_allclose(batched, single.scores(variables, img), atol=1e-5)


def test_warm_compiles_each_canvas_once_in_the_background(tiny_variables):
  model, variables = six_class_model(tiny_variables)
  traced, said = [], []
  seg = counting_segmenter(model, InferenceConfig(tta=True), traced, threads=1, notify=said.append)
  img = VariedSizes(1)[0][0][:20, :20]
  seg.warm(variables, img.shape[:2])
  seg.warm(variables, img.shape[:2])  # already compiling: nothing new
  assert seg.forward.programs == [(2, 32, 32), (2, 64, 64)]  # views 10..30 px pad to 32, 35 px to 64
  scores = seg.scores(variables, img)
  assert said == ["compiling the forward for 32x32 views, batch 2",
                  "compiling the forward for 64x64 views, batch 2"]
  assert sorted(traced) == [(2, 32, 32, 3), (2, 64, 64, 3)]  # each traced (and compiled) once
  assert scores.shape == (20, 20, 6)
  np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)


class Sized(VariedSizes):
  """VariedSizes with the given sizes, one image each."""

  def __init__(self, sizes):
    super().__init__(len(sizes))
    self.sizes = sizes


def test_programs_do_not_grow_with_new_image_sizes(tiny_variables):
  """After one evaluation, images of sizes never seen compile nothing, whole and TTA: views run
  on the config's canvases, the resize to the original size in fixed tiles (images of 64-600 px:
  original sizes in several blocks of 128 px, which the old per-size resize compiled for)."""
  _, variables = six_class_model(tiny_variables)
  model = segnext("t", **TINY, num_classes=6, dw_impl="lax")  # any impl; lax compiles fastest
  # views of 128 x 192/256 px; then 128 x 160/224 px, new /32 shapes in the same canvases
  first = [(64, 96), (64, 128), (96, 64), (128, 64), (200, 300), (300, 600)]
  more = [(64, 80), (64, 112), (80, 64), (112, 64), (150, 170), (260, 300), (390, 330), (450, 270)]
  whole = InferenceConfig(scale=(256, 128), batch_size=2)
  canvases = lambda sizes: {whole.canvas(v.shape) for s in sizes for v in whole.views(s)}
  assert canvases(more) == canvases(first) == {(128, 192), (128, 256), (192, 128), (256, 128)}
  shapes = lambda sizes: {ceil_to(v.shape, 32) for s in sizes for v in whole.views(s)}
  assert not shapes(more) & shapes(first)
  seg = Segmenter.for_model(model, whole)
  jax.clear_caches()  # part programs are the process's (staged.py): count this test's own
  with xla_programs() as built:
    evaluate(seg, variables, Sized(first), progress=False)
  assert len(built) >= 3  # this counter sees the programs: one forward per canvas at least
  with xla_programs() as built:
    r = evaluate(seg, variables, Sized(more), progress=False)
  assert built == [] and r["images"] == len(more)

  tta = InferenceConfig(tta=True)  # views of the original x 0.5-1.75: the canvases follow its size
  first, more = [(40, 56)], [(30, 55), (37, 60), (43, 66)]
  canvases = lambda sizes: {tta.canvas(v.shape) for s in sizes for v in tta.views(s)}
  assert canvases(more) <= canvases(first) and len(canvases(first)) == 5
  seg = Segmenter.for_model(model, tta)
  evaluate(seg, variables, Sized(first), progress=False)
  with xla_programs() as built:
    evaluate(seg, variables, Sized(more), progress=False)
  assert built == []


def test_inference_config_from_a_train_config_or_its_saved_dict():
  from segnext_jax.config import TrainConfig
  cfg = InferenceConfig.from_train(TrainConfig(resize_scale=(1024, 256), eval_mode="slide"), batch_size=2)
  assert (cfg.scale, cfg.mode, cfg.crop, cfg.stride, cfg.batch_size) == \
      ((1024, 256), "slide", TrainConfig.eval_crop, TrainConfig.eval_stride, 2)
  saved = {"resize_scale": [2048, 1024], "eval_crop": [64, 64], "steps": 5}  # JSON lists; no mode
  cfg = InferenceConfig.from_train(saved, stride=(48, 48), tta=True)
  assert (cfg.scale, cfg.mode, cfg.crop, cfg.stride, cfg.tta) == \
      ((2048, 1024), TrainConfig.eval_mode, (64, 64), (48, 48), True)


def test_report_json_keeps_its_fields_in_order():
  from segnext_jax.eval import report
  res = {"aAcc": 0.5, "mIoU": 0.25, "mAcc": 1 / 3, "IoU": np.array([0.25, np.nan]),
         "Acc": np.array([1 / 3, np.nan]), "images": 2, "images_per_s": 1.5, "seconds": 1.3,
         "confusion": np.eye(2, dtype=np.int64), "devices": 2, "processes": 1}
  doc = report.to_json(res, ["a", "b"], {"data": "x"})
  assert list(doc) == ["aAcc", "mIoU", "mAcc", "per_class", "IoU", "confusion", "images",
                       "images_per_s", "devices", "processes", "settings"]
  assert doc["IoU"] == [25.0, None] and doc["confusion"] == [[1, 0], [0, 1]] and doc["devices"] == 2
  json.dumps(doc)  # plain JSON types only
  assert doc["mAcc"] == 33.3333 and doc["per_class"] == {"a": {"IoU": 25.0, "Acc": 33.3333},
                                                         "b": {"IoU": None, "Acc": None}}
  assert "| a | 25.00 | 33.33 |" in report.format_table(res, ["a", "b"])
