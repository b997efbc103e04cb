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
