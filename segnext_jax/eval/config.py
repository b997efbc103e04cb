"""How an image becomes views and views become scores: the test pipeline, the inference mode, and
the padded shapes ("canvases") that whole-mode views run at."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import numpy as np

from segnext_jax import padding
from segnext_jax.config import TrainConfig
from segnext_jax.errors import InputError
from segnext_jax.eval import views as views_lib
from segnext_jax.eval.views import Pipeline, Prepared, Size, View
from segnext_jax.model import TOTAL_STRIDE
from segnext_jax.recipes import RECIPES

# TrainConfig field -> InferenceConfig field: the validation inference a training run describes.
TRAIN_FIELDS = {"resize_scale": "scale", "eval_mode": "mode", "eval_crop": "crop",
                "eval_stride": "stride"}

_ADE = RECIPES["ade20k"]


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """The test pipeline (see eval/views.py), the mode, and how views are padded and batched."""
  pipeline: Pipeline = "mmseg1"
  tta: bool = False                    # multi-scale + flip, mean of softmax
  # scale, mode, crop, stride: by default the ADE20K recipe's, as for the commands (from_train)
  scale: Size = tuple(_ADE["resize_scale"])  # (long, short) bound of the resize (and official TTA)
  mode: Literal["whole", "slide"] = _ADE["eval_mode"]
  crop: Size = tuple(_ADE["eval_crop"])      # slide window
  stride: Size = tuple(_ADE["eval_stride"])
  batch_size: int = 4                  # evaluate(): single-view images of one canvas run together
  size_divisor: int = TOTAL_STRIDE    # padded inference needs multiples of the network's stride
  buckets_per_octave: int = 2          # whole mode: canvas sizes per octave, each axis (0: each /32 size)

  def __post_init__(self):
    if self.buckets_per_octave < 0:
      raise InputError(f"buckets_per_octave must be >= 0 (0: no buckets), got {self.buckets_per_octave}")
    if self.batch_size < 1:
      raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.mode not in ("whole", "slide"):
      raise InputError(f"unknown inference mode {self.mode!r}; expected 'whole' or 'slide'")

  @classmethod
  def from_train(cls, train: TrainConfig | Mapping[str, Any], **fields: Any) -> InferenceConfig:
    """The validation inference of a training config: a TrainConfig, or its saved JSON dict
    (a field it lacks takes TrainConfig's default); `fields` set the others or override."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    given = train if isinstance(train, Mapping) else vars(train)
    mapped = {ours: given.get(theirs, defaults[theirs]) for theirs, ours in TRAIN_FIELDS.items()}
    mapped = {k: v if isinstance(v, str) else tuple(v) for k, v in mapped.items()}
    return cls(**{**mapped, **fields})

  def views(self, hw: Size) -> list[View]:
    return views_lib.views(hw, self.pipeline, self.scale, self.tta, self.size_divisor)

  def canvas(self, hw: Size) -> Size:
    """The padded shape a view of (h, w) runs at: /size_divisor, then the next of
    `buckets_per_octave` sizes per octave on each axis. Views of any size share these few
    shapes (padding.py makes padded inference exact), so the programs compiled for them are a
    set fixed by the sizes' range, not by how many images come or of which sizes."""
    h, w = views_lib.ceil_to(hw, self.size_divisor)
    return padding.bucket(h, self.buckets_per_octave), padding.bucket(w, self.buckets_per_octave)

  def prepare(self, img: np.ndarray, view: View) -> Prepared:
    """uint8 RGB image -> one view as the model takes it, zero-padded to /size_divisor, with
    its sizes and canvas (computed here, once, and carried from then on)."""
    x = views_lib.view_pixels(img, view)
    padded = views_lib.ceil_to(x.shape[:2], self.size_divisor)
    return Prepared(views_lib.pad_to(x, padded), x.shape[:2], img.shape[:2], self.canvas(padded),
                    view.flip)

  @property
  def batches_images(self) -> bool:
    """Single-view whole inference: several images can share one forward pass."""
    return self.mode == "whole" and not self.tta
