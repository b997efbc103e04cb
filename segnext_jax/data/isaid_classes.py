"""iSAID (16 classes, background included): names and colours, one row per class.

A row is (name, RGB): index = the value in mmseg's isaid converter's
`ann_dir/*_instance_color_RGB.png` class-id maps (the converter turns these colours of the released
semantic masks into ids; 255 = its padding of images under 896 px). Names and colours as mmseg's
iSAIDDataset.
"""

ISAID = (
  ('background',           (  0,   0,   0)),
  ('ship',                 (  0,   0,  63)),
  ('store_tank',           (  0,  63,  63)),
  ('baseball_diamond',     (  0,  63,   0)),
  ('tennis_court',         (  0,  63, 127)),
  ('basketball_court',     (  0,  63, 191)),
  ('Ground_Track_Field',   (  0,  63, 255)),
  ('Bridge',               (  0, 127,  63)),
  ('Large_Vehicle',        (  0, 127, 127)),
  ('Small_Vehicle',        (  0,   0, 127)),
  ('Helicopter',           (  0,   0, 191)),
  ('Swimming_pool',        (  0,   0, 255)),
  ('Roundabout',           (  0, 191, 127)),
  ('Soccer_ball_field',    (  0, 127, 191)),
  ('plane',                (  0, 127, 255)),
  ('Harbor',               (  0, 100, 155)),
)
