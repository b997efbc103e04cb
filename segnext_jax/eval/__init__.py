"""Evaluation as mmseg does it: test pipelines, scores at the original size, IoUMetric.

  views.py     the views a test pipeline makes of an image (mmseg 1.x, official), host-side
  config.py    InferenceConfig: pipeline, TTA, scale, whole/slide, batch, canvases
  original.py  a view's logits -> the original size (mmseg's postprocess), merged over views
  scores.py    the pure layer: Segmenter(forward, cfg).scores / .classes of one image
  compiled.py  the optional wrapper: views padded to fixed canvases, compiled ahead in threads
  metrics.py   IoUMetric: confusion matrix -> aAcc, mIoU, mAcc, per-class IoU/Acc
  loop.py      evaluate(segmenter, variables, dataset) -> metrics

One entry point per job: `Segmenter.for_model(model, cfg)` builds the inference;
`.scores(variables, img)` gives (H, W, K) logits or mean TTA probabilities, `.classes(...)`
the (H, W) class map, both at the image's own size; `evaluate(...)` gives a dataset's metrics.
"""
from segnext_jax.eval.compiled import CompiledForward
from segnext_jax.eval.config import InferenceConfig
from segnext_jax.eval.loop import evaluate
from segnext_jax.eval.metrics import confusion_matrix, metrics_from_confusion
from segnext_jax.eval.original import to_original
from segnext_jax.eval.scores import ExactForward, Segmenter, model_apply
from segnext_jax.eval.views import PIPELINES, TTA_RATIOS, View, prepare, views

__all__ = ["CompiledForward", "ExactForward", "InferenceConfig", "PIPELINES", "Segmenter",
           "TTA_RATIOS", "View", "confusion_matrix", "evaluate", "metrics_from_confusion",
           "model_apply", "prepare", "to_original", "views"]
