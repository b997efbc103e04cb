"""Evaluation as mmseg does it: test pipelines, scores at the original size, IoUMetric.

  views.py     the views a test pipeline makes of an image (mmseg 1.x, official), host-side
  config.py    InferenceConfig: pipeline, TTA, scale, whole/slide, batch, canvases, prepare
  original.py  a view's logits -> the original size (mmseg's postprocess), merged over views
  scores.py    Segmenter(forward, cfg).scores / .classes of one image
  compiled.py  its whole-mode forward: views padded to fixed canvases, compiled ahead in threads
  metrics.py   IoUMetric: confusion matrix -> aAcc, mIoU, mAcc, per-class IoU/Acc
  loop.py      evaluate(segmenter, variables, dataset) -> metrics
  report.py    metrics -> eval.py's table and its --out JSON

One entry point per job: `Segmenter.for_model(model, cfg)` builds the inference;
`.scores(variables, img)` gives (H, W, K) logits or mean TTA probabilities, `.classes(...)`
the (H, W) class map, both at the image's own size; `evaluate(...)` gives a dataset's metrics.
A view is prepared once (`cfg.prepare(img, view)`: a `Prepared` record of its pixels, sizes and
canvas) and carried from there to the forward and back to the image's size.
"""
from segnext_jax.eval.compiled import CompiledForward
from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.loop import evaluate
from segnext_jax.eval.metrics import confusion_matrix, metrics_from_confusion
from segnext_jax.eval.original import to_original
from segnext_jax.eval.scores import Segmenter, model_apply
from segnext_jax.eval.views import PIPELINES, TTA_RATIOS, Prepared, View, views

__all__ = ["CompiledForward", "InferenceConfig", "PIPELINES", "Prepared", "Segmenter",
           "TTA_RATIOS", "View", "confusion_matrix", "evaluate", "metrics_from_confusion",
           "model_apply", "to_original", "views"]
