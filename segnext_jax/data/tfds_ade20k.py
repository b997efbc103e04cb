"""TFDS builder `ade20k_semantic`: ADE20K SceneParsing with its 150-class semantic labels, built
from the user's ADEChallengeData2016.zip into array_record, read with `tfds.data_source`.

Prepare once (no TensorFlow needed):
  python -m segnext_jax.data.tfds_ade20k --manual_dir DIR_WITH_ZIP [--data_dir DATA_DIR]
then train/eval with `--data tfds:ade20k_semantic[:DATA_DIR]`. Examples keep the zip's original
bytes: `image` (JPEG), `annotation` (PNG, 0 = other, 1..150 = classes) and `file_name`.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from segnext_jax.data import files
from segnext_jax.data.ade20k_classes import ADE20K
from segnext_jax.data.files import DataError, MissingDataError

NAME = "ade20k_semantic"
ZIP_NAME = "ADEChallengeData2016.zip"
SPLIT_FOLDERS = {"train": "training", "validation": "validation"}
RAW_LUT = files.label_lut()  # the stored PNG values, checked before reduce_zero_label
CITATION = """@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and Barriuso, Adela
          and Torralba, Antonio},
  booktitle={CVPR}, year={2017}}"""


class Ade20kSemantic(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (MIT Scene Parsing Benchmark), 150 semantic classes; train/validation."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016: 20,210 train / 2,000 validation pairs."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {ZIP_NAME} (http://data.csail.mit.edu/places/ADEchallenge/{ZIP_NAME}) and put "
      "it, unextracted, in the manual dir (--manual_dir; tfds default "
      "~/tensorflow_datasets/downloads/manual/).")

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file; tfds 4.9.10 looks it up with `importlib_resources`, a dependency it declares
    only for Python < 3.9 (tensorflow/datasets#11212)."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("ADE20K scene parsing, 150 classes. annotation: 0 = other (mmseg's "
                     "reduce_zero_label maps 0 -> 255 ignore, c -> c - 1)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "annotation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "annotation"),
        homepage="http://sceneparsing.csail.mit.edu/",
        citation=CITATION)

  def _split_generators(self, dl_manager):
    path = Path(dl_manager.manual_dir) / ZIP_NAME
    if not path.is_file():
      raise MissingDataError(f"{path}: missing. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(path, folder) for split, folder in SPLIT_FOLDERS.items()}

  def _generate_examples(self, path: Path, folder: str):
    with zipfile.ZipFile(path) as zf:
      for stem, image, mask in zip_pairs(zf, folder):
        image_bytes, mask_bytes = zf.read(image), zf.read(mask)
        files.scan_pair(image_bytes, mask_bytes, RAW_LUT, 151, f"{path}:{image}", f"{path}:{mask}")
        yield stem, {"image": image_bytes, "annotation": mask_bytes, "file_name": stem}


def zip_pairs(zf: zipfile.ZipFile, folder: str) -> list[tuple[str, str, str]]:
  """(stem, image member, mask member) of one split folder; DataError names a lone file."""
  def members(kind: str, suffix: str) -> dict[str, str]:
    pattern = re.compile(rf"(?:.*/)?{kind}/{folder}/([^/]+){re.escape(suffix)}$")
    return {m[1]: m[0] for m in map(pattern.match, zf.namelist()) if m}
  images, masks = members("images", ".jpg"), members("annotations", ".png")
  if not images:
    raise MissingDataError(f"{zf.filename}: no images/{folder}/*.jpg (is it {ZIP_NAME}?)")
  lone = sorted(set(images) ^ set(masks))
  if lone:
    name = images.get(lone[0]) or masks[lone[0]]
    raise DataError(f"{zf.filename}:{name}: has no matching "
                    f"{'annotation' if lone[0] in images else 'image'} ({len(lone)} unpaired)")
  return [(s, images[s], masks[s]) for s in sorted(images)]


def prepare(manual_dir: str | Path, data_dir: str | Path | None = None) -> Path:
  """Build the array_record files once from manual_dir/ADEChallengeData2016.zip."""
  zip_path = Path(manual_dir) / ZIP_NAME
  if not zip_path.is_file():
    raise MissingDataError(f"{zip_path}: missing. {Ade20kSemantic.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder = Ade20kSemantic(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return Path(builder.data_dir)


class TFDSADE20K:
  """A prepared `ade20k_semantic` split; labels with mmseg's reduce_zero_label (0 -> 255)."""
  num_classes = len(ADE20K)
  class_names = tuple(name for name, _ in ADE20K)
  palette = np.array([rgb for _, rgb in ADE20K], np.uint8)
  lut = files.label_lut(reduce_zero_label=True)

  def __init__(self, split: str, data_dir: str | None = None):
    builder = Ade20kSemantic(data_dir=data_dir)
    if not builder.is_prepared():
      raise MissingDataError(
          f"{builder.data_dir}: tfds {NAME} is not prepared there; prepare it once with: python -m "
          "segnext_jax.data.tfds_ade20k --manual_dir DIR_WITH_ZIP --data_dir DATA_DIR")
    raw = {"image": tfds.decode.SkipDecoding(), "annotation": tfds.decode.SkipDecoding()}
    self.source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                                   decoders=raw)

  def __len__(self) -> int:
    return len(self.source)

  def name(self, i: int) -> str:
    return self.source[i]["file_name"].decode()

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    ex = self.source[i]
    name = f"{NAME}:{ex['file_name'].decode()}"
    img, label, _ = files.load_pair(ex["image"], ex["annotation"], self.lut, self.num_classes,
                                    name + ".jpg", name + ".png")
    return img, label

  def validate(self, workers: int | None = None, decode_images: bool = False) -> None:
    """Nothing to do: every pair was checked while preparing."""


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--manual_dir", required=True, help=f"folder holding {ZIP_NAME}")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data dir (default ~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  print(f"prepared {prepare(args.manual_dir, args.data_dir)}")


if __name__ == "__main__":
  main()
