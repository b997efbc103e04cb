"""Pascal VOC 2012 (21 classes, background included): names and colours, one row per class.

A row is (name, RGB): index = the value in `SegmentationClass/*.png` (palette PNGs whose index is
the class; 255 = the object borders, ignored) and `SegmentationClassAug/*.png` (mmseg's voc_aug
converter, grey). Names and colours as mmseg's PascalVOCDataset, whose palette is the PNGs' own.
"""

VOC = (
  ('background',    (  0,   0,   0)),
  ('aeroplane',     (128,   0,   0)),
  ('bicycle',       (  0, 128,   0)),
  ('bird',          (128, 128,   0)),
  ('boat',          (  0,   0, 128)),
  ('bottle',        (128,   0, 128)),
  ('bus',           (  0, 128, 128)),
  ('car',           (128, 128, 128)),
  ('cat',           ( 64,   0,   0)),
  ('chair',         (192,   0,   0)),
  ('cow',           ( 64, 128,   0)),
  ('diningtable',   (192, 128,   0)),
  ('dog',           ( 64,   0, 128)),
  ('horse',         (192,   0, 128)),
  ('motorbike',     ( 64, 128, 128)),
  ('person',        (192, 128, 128)),
  ('pottedplant',   (  0,  64,   0)),
  ('sheep',         (128,  64,   0)),
  ('sofa',          (  0, 192,   0)),
  ('train',         (128, 192,   0)),
  ('tvmonitor',     (  0,  64, 128)),
)
