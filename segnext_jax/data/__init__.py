"""Datasets, their checks, the train transforms and the loader that batches them."""

IGNORE_INDEX = 255  # the label value that counts neither in the loss nor in the metrics (mmseg's)
