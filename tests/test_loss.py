"""seg_cross_entropy with mmseg's CrossEntropyLoss options (class_weight, avg_non_ignore): the loss
and its gradient w.r.t. the logits equal mmseg's decode-head loss (bilinear resize to the label
size, then CrossEntropyLoss), on the CPU's row-chunked loss and on the plain one."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from segnext_jax import backend
from segnext_jax.loss import seg_cross_entropy
from segnext_jax.mmseg_reference import stub_mmcv_ops

K = 5
WEIGHTS = (0.5, 2.0, 1.0, 3.5, 0.25)


def mmseg_loss(logits: np.ndarray, labels: np.ndarray, class_weight, avg_non_ignore: bool):
  """mmseg 1.x's BaseDecodeHead.loss_by_feat on (B,h,w,K) logits: loss, d loss / d logits."""
  import torch
  stub_mmcv_ops()
  from mmseg.models.losses import CrossEntropyLoss
  from mmseg.models.utils import resize
  x = torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 3, 1, 2))).requires_grad_()
  up = resize(x, size=labels.shape[1:], mode="bilinear", align_corners=False)
  loss_fn = CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0, avg_non_ignore=avg_non_ignore,
                             class_weight=None if class_weight is None else list(class_weight))
  loss = loss_fn(up, torch.from_numpy(labels.astype(np.int64)), weight=None, ignore_index=255)
  loss.backward()
  return float(loss), x.grad.numpy().transpose(0, 2, 3, 1)


def jax_loss(logits, labels, class_weight, avg_non_ignore: bool, chunked: bool):
  f = jax.value_and_grad(lambda x: seg_cross_entropy(x, labels, class_weight, avg_non_ignore))
  with backend.override(chunked_loss=chunked):
    loss, grad = jax.jit(f)(logits)
  return float(loss), np.asarray(grad)


def sample(seed: int = 0, ignored: bool = True):
  rng = np.random.default_rng(seed)
  logits = (2 * rng.standard_normal((2, 9, 13, K))).astype(np.float32)
  labels = rng.integers(0, K, (2, 35, 50)).astype(np.int32)
  if ignored:
    labels[0, :12] = 255                 # ignored rows
    labels[1][labels[1] == 3] = 255      # a class ignored wherever it is in one image
  return logits, labels


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "plain"])
@pytest.mark.parametrize("avg_non_ignore", [False, True], ids=["all_pixels", "avg_non_ignore"])
@pytest.mark.parametrize("class_weight", [None, WEIGHTS], ids=["unweighted", "weighted"])
def test_loss_and_gradient_match_mmseg(class_weight, avg_non_ignore, chunked):
  """Unweighted with ignored pixels; weighted on labels without them (mmseg 1.2.2 cannot weigh an
  ignored pixel: the next test)."""
  logits, labels = sample(ignored=class_weight is None)
  loss_t, grad_t = mmseg_loss(logits, labels, class_weight, avg_non_ignore)
  loss, grad = jax_loss(logits, labels, class_weight, avg_non_ignore, chunked)
  assert abs(loss - loss_t) <= 2e-6 * abs(loss_t), (loss, loss_t)
  np.testing.assert_allclose(grad, grad_t, rtol=0, atol=2e-6 * np.abs(grad_t).max())


def test_weighted_loss_with_ignored_pixels(monkeypatch):
  """Where mmseg 1.2.2 fails (class weights and an ignored pixel: IndexError), the loss is its
  formula with an ignored pixel counting 1 in the divisor (0 with avg_non_ignore): weights of 1
  give the unweighted loss; all pixels ignored give 0, not NaN."""
  logits, labels = sample(1)
  with pytest.raises(IndexError):
    mmseg_loss(logits, labels, WEIGHTS, True)
  for avg in (False, True):
    for chunked in (True, False):
      plain = jax_loss(logits, labels, None, avg, chunked)
      ones = jax_loss(logits, labels, (1.0,) * K, avg, chunked)
      assert ones[0] == pytest.approx(plain[0], rel=1e-6)
      np.testing.assert_allclose(ones[1], plain[1], rtol=0, atol=1e-6 * np.abs(plain[1]).max())
      weighted = jax_loss(logits, labels, WEIGHTS, avg, chunked)[0]
      assert weighted == pytest.approx(reference(logits, labels, WEIGHTS, avg), rel=2e-6)
      loss, grad = jax_loss(logits, np.full_like(labels, 255), WEIGHTS, avg, chunked)
      assert loss == 0.0 and np.all(grad == 0.0)
  with pytest.raises(ValueError, match="class_weight has 3 weights for 5 classes"):
    seg_cross_entropy(logits, labels, (1.0, 1.0, 1.0))


def reference(logits, labels, class_weight, avg_non_ignore: bool) -> float:
  """The weighted loss in float64 numpy, from mmseg's resize (torch's, in float64)."""
  import torch
  import torch.nn.functional as F
  x = torch.from_numpy(logits.transpose(0, 3, 1, 2).astype(np.float64))
  up = F.interpolate(x, size=labels.shape[1:], mode="bilinear", align_corners=False).numpy()
  logp = up - np.log(np.exp(up).sum(axis=1, keepdims=True))
  valid = labels != 255
  safe = np.where(valid, labels, 0)
  nll = -np.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
  w = np.where(valid, np.asarray(class_weight)[safe], 0.0)
  count = w.sum() + (0 if avg_non_ignore else (~valid).sum())
  return float((w * nll).sum() / count)
