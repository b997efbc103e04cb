"""Cityscapes (19 evaluated classes): names, colours and raw label ids, one row per class.

A row is (name, RGB, labelId): index = trainId, the value in `*_gtFine_labelTrainIds.png`;
labelId is the value in `*_gtFine_labelIds.png` (cityscapesScripts `labels.py`); every other
labelId maps to 255 (ignore). Names and colours as mmseg's CityscapesDataset.
"""

CITYSCAPES = (
  ('road',              (128,  64, 128),   7),
  ('sidewalk',          (244,  35, 232),   8),
  ('building',          ( 70,  70,  70),  11),
  ('wall',              (102, 102, 156),  12),
  ('fence',             (190, 153, 153),  13),
  ('pole',              (153, 153, 153),  17),
  ('traffic light',     (250, 170,  30),  19),
  ('traffic sign',      (220, 220,   0),  20),
  ('vegetation',        (107, 142,  35),  21),
  ('terrain',           (152, 251, 152),  22),
  ('sky',               ( 70, 130, 180),  23),
  ('person',            (220,  20,  60),  24),
  ('rider',             (255,   0,   0),  25),
  ('car',               (  0,   0, 142),  26),
  ('truck',             (  0,   0,  70),  27),
  ('bus',               (  0,  60, 100),  28),
  ('train',             (  0,  80, 100),  31),
  ('motorcycle',        (  0,   0, 230),  32),
  ('bicycle',           (119,  11,  32),  33),
)
