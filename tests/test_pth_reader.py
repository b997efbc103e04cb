"""segnext_jax.pth_reader: torch.save's files read without torch, equal to torch.load's tensors
(every storage dtype, views with offsets and strides, shared storages, parameters, metadata),
and a whole conversion without torch equal to the one with it."""
from __future__ import annotations

import collections
import sys

import numpy as np
import pytest

from segnext_jax import pth_reader


def test_tensors_and_metadata_equal_torch_load(tmp_path):
  import torch
  t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  g = torch.Generator().manual_seed(0)
  sd = collections.OrderedDict(
      plain=t, transposed=t.t(), window=t[1:, 2:5], shared=t.view(-1)[3:9],
      half=torch.randn(3, generator=g).half(), bf16=torch.randn(2, 2, generator=g).bfloat16(),
      f64=torch.randn(2, generator=g).double(), i64=torch.tensor(7), i32=torch.arange(3, dtype=torch.int32),
      u8=torch.tensor([0, 255], dtype=torch.uint8), flags=torch.tensor([True, False]),
      param=torch.nn.Parameter(torch.ones(2, 3)), empty=torch.zeros(0, 4))
  obj = {"state_dict": sd, "meta": {"CLASSES": ("a", "b"), "PALETTE": [[1, 2, 3]], "step": 5,
                                    "np": np.float64(3.5)}}
  torch.save(obj, tmp_path / "x.pth")
  got = pth_reader.read(tmp_path / "x.pth")
  assert list(got["state_dict"]) == list(sd)
  for k, v in sd.items():
    want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    a = got["state_dict"][k]
    assert a.shape == want.shape and a.flags.owndata, k
    np.testing.assert_array_equal(np.asarray(a, want.dtype), want, err_msg=k)
  assert str(got["state_dict"]["bf16"].dtype) == "bfloat16"
  meta = got["meta"]
  assert meta["CLASSES"] == ("a", "b") and meta["PALETTE"] == [[1, 2, 3]] and meta["step"] == 5
  assert isinstance(meta["np"], pth_reader.Opaque)  # a numpy scalar: named, never built


def test_nothing_in_the_file_is_called_and_bad_files_are_one_line(tmp_path, capsys):
  import torch

  class Boom:
    def __reduce__(self):
      return (print, ("called!",))
  torch.save({"w": torch.ones(2), "evil": Boom()}, tmp_path / "evil.pth")
  got = pth_reader.read(tmp_path / "evil.pth")
  assert isinstance(got["evil"], pth_reader.Opaque) and got["evil"].name.endswith(".print")
  assert "called!" not in capsys.readouterr().out
  (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(pth_reader.PthError, match="junk.pth: not a torch zip checkpoint"):
    pth_reader.read(tmp_path / "junk.pth")


def test_conversion_without_torch_equals_the_one_with_it(torch_ref_t, monkeypatch):
  from segnext_jax import torch_io
  import jax
  with_torch, meta, _ = torch_io.convert_file(torch_ref_t.path)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  without, meta2, _ = torch_io.convert_file(torch_ref_t.path)
  assert jax.tree.structure(without) == jax.tree.structure(with_torch)
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_torch)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta2["variant"] == meta["variant"] and meta2["model"] == meta["model"]


def released_layouts(sd: dict) -> dict:
  """The files the converter reads, as their releases wrap them: mmseg 1.x segmentors (meta with
  dataset_meta and the config text, optimizer state, schedulers), the official repository's
  (mmseg 0.x: CLASSES/PALETTE, mlp.dwconv.dwconv keys), and the ImageNet MSCAN backbones of
  both (bare, with the classifier's head.* keys)."""
  import torch
  official = lambda d: {k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv."): v for k, v in d.items()}
  backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
  backbone.update({"head.weight": torch.randn(1000, backbone["norm4.weight"].shape[0]),
                   "head.bias": torch.zeros(1000)})
  optimizer = {"state": {0: {"step": torch.tensor(160000.0), "exp_avg": torch.zeros(3)}},
               "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999), "params": [0]}]}
  return {
      "mmseg 1.x segmentor": {
          "meta": {"mmseg_version": "1.0.0", "epoch": 0, "iter": 160000, "seed": 0,
                   "dataset_meta": {"classes": ("wall", "building"), "palette": [[120, 120, 120]]},
                   "cfg": "model = dict(decode_head=dict(ham_kwargs=dict(MD_R=16)))"},
          "state_dict": collections.OrderedDict(sd), "optimizer": optimizer,
          "param_schedulers": [{"start_factor": 1e-6, "end": 1500, "last_step": 160000}],
          "message_hub": {"log_scalars": {}, "runtime_info": {"iter": 160000}}},
      "official segmentor": {
          "meta": {"CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120]],
                   "config": "norm_cfg = dict(type='SyncBN')", "env_info": "sys.platform: linux",
                   "seed": 0, "iter": 160000},
          "state_dict": collections.OrderedDict(official(sd)), "optimizer": optimizer},
      "mmseg MSCAN backbone": collections.OrderedDict(backbone),
      "official MSCAN backbone": {"state_dict": collections.OrderedDict(official(backbone))},
  }


def test_every_released_layout_reads_as_torch_loads_it(tmp_path, monkeypatch):
  """Each released wrapping, written by torch.save: the torch-free reader's tensors equal
  torch.load's one by one, and the conversion without torch equals the one with it."""
  import jax
  import torch
  from conftest import TINY
  from segnext_jax import torch_io
  from segnext_jax.mmseg_reference import mmseg_segmentor_modules, segmentor_state_dict
  sd = segmentor_state_dict(*mmseg_segmentor_modules("t", **TINY))
  files = {}
  for name, obj in released_layouts(sd).items():
    files[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
    torch.save(obj, files[name])
  converted = {}
  for name, path in files.items():
    want = torch.load(path, weights_only=False)
    got = pth_reader.read(path)
    flat_want = {k: v for k, v in _tensors(want)}
    flat_got = dict(_tensors(got))
    assert flat_got.keys() == flat_want.keys() and len(flat_got) > 10, name
    for k, v in flat_want.items():
      np.testing.assert_array_equal(flat_got[k], v.numpy(), err_msg=f"{name}: {k}")
    converted[name] = torch_io.convert_file(path)
  monkeypatch.setitem(sys.modules, "torch", None)
  for name, path in files.items():
    without, meta, report = torch_io.convert_file(path)
    with_torch, meta_t, report_t = converted[name]
    assert report.source_format == report_t.source_format and meta == meta_t, name
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_torch), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _tensors(obj, prefix: str = ""):
  """(path, tensor or array) of every tensor in a nested checkpoint object."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _tensors(v, f"{prefix}/{k}")
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _tensors(v, f"{prefix}/{i}")
  elif hasattr(obj, "shape") and not isinstance(obj, pth_reader.Opaque):
    yield prefix, obj
