"""Deploy paths from a fresh converted checkpoint: ONNX (onnxruntime), StableHLO (jax.export) and
back to an mmseg .pth, each against the JAX model (fixed NMF bases included)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import FP32_ATOL, TINY, TorchReference, command, mmseg_segmentor_modules
from export_helpers import (REPO, assert_same_classes, jax_reference, mmseg_from_pth,
                            mmseg_logits, padded_jpeg, random_variables)
from segnext_jax.checkpoint import load_checkpoint

pytest.importorskip("onnxruntime")
SIZES = [(1, 64, 96), (2, 96, 64)]  # two batch sizes and image sizes, one exported file


def images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((b, h, w, 3), np.float32)


@pytest.fixture(scope="module")
def converted(torch_ref_t, tmp_path_factory) -> Path:
  """convert/from_torch.py on a random-weight mmseg SegNeXt-T .pth."""
  out = tmp_path_factory.mktemp("export") / "segnext_t"
  assert command("from_torch").main([str(torch_ref_t.path), "-o", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def reference(converted):
  return jax_reference(*load_checkpoint(converted))


@pytest.fixture(scope="module")
def exported(converted) -> dict[str, Path]:
  cli = command("export")
  paths = {}
  for fmt, suffix in (("onnx", "onnx"), ("stablehlo", "stablehlo")):
    paths[fmt] = converted.parent / f"segnext_t.{suffix}"
    assert cli.main([str(converted), "--format", fmt, "-o", str(paths[fmt])]) == 0
  return paths


@pytest.fixture(scope="module")
def onnx_session(exported):
  import onnxruntime as ort
  return ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])


def test_onnx_matches_jax(exported, onnx_session, reference):
  import onnx
  onnx.checker.check_model(str(exported["onnx"]), full_check=True)
  proto = onnx.load(str(exported["onnx"]))
  assert proto.ir_version == 8 and proto.opset_import[0].version == 18  # onnxruntime >= 1.15
  (inp,), (out,) = onnx_session.get_inputs(), onnx_session.get_outputs()
  assert inp.name == "images" and inp.shape == ["b", "32*h", "32*w", 3]
  assert out.name == "logits" and out.shape == ["b", "4*h", "4*w", 150]
  for b, h, w in SIZES:
    x = images(b, h, w)
    got = onnx_session.run(None, {"images": x})[0]
    want = reference(x)
    assert got.shape == (b, h // 8, w // 8, 150)
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
  pair = np.concatenate([x[:1], x[:1]])  # fixed bases: an image's answer ignores its batch
  twice = onnx_session.run(None, {"images": pair})[0]
  np.testing.assert_array_equal(twice[0], twice[1])


STABLEHLO_RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    from jax import export
    exported = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    inputs = np.load(sys.argv[2])
    np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
    try:
      exported.call(np.zeros((1, 70, 96, 3), np.float32))
      sys.exit("a height that is not a multiple of 32 was accepted")
    except ValueError:
      pass
    assert "flax" not in sys.modules and "segnext_jax" not in sys.modules, sorted(sys.modules)
""")


def test_stablehlo_runs_without_flax(exported, reference, tmp_path):
  inputs = {f"x{i}": images(*size, seed=i) for i, size in enumerate(SIZES)}
  np.savez(tmp_path / "in.npz", **inputs)
  subprocess.run([sys.executable, "-c", STABLEHLO_RUNNER, str(exported["stablehlo"]),
                  str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                 check=True, cwd=tmp_path, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  outs = np.load(tmp_path / "out.npz")
  for k, x in inputs.items():
    np.testing.assert_allclose(outs[k], reference(x), rtol=0, atol=FP32_ATOL)


def test_real_jpeg_same_class_map(exported, onnx_session, reference):
  from jax import export
  x = padded_jpeg(REPO / "tests/data/ade20k_val3/images/validation/ADE_val_00000003.jpg")
  want = reference(x)
  shlo = export.deserialize(bytearray(exported["stablehlo"].read_bytes()))
  for got in (onnx_session.run(None, {"images": x})[0], np.asarray(shlo.call(x))):
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
    assert_same_classes(got, want, FP32_ATOL)


def test_to_torch_gives_mmseg_the_same_logits(converted, reference, tmp_path):
  pth = tmp_path / "back.pth"
  assert command("to_torch").main([str(converted), "-o", str(pth)]) == 0
  segmentor, obj = mmseg_from_pth(pth)  # mmseg's EncoderDecoder from meta['cfg'], strict=True
  assert obj["meta"]["segnext_jax"]["nmf_rank"] == 16
  for b, h, w in SIZES:
    x = images(b, h, w)
    np.testing.assert_allclose(mmseg_logits(segmentor, obj, x), reference(x), rtol=0, atol=FP32_ATOL)


def test_pth_jax_pth_is_bit_exact(torch_ref_t, converted, tmp_path):
  import torch
  pth = tmp_path / "back.pth"
  assert command("to_torch").main([str(converted), "-o", str(pth)]) == 0
  orig = torch.load(torch_ref_t.path, weights_only=True)["state_dict"]
  back = torch.load(pth, weights_only=True)["state_dict"]
  assert list(back) == sorted(orig)
  for k, t in orig.items():
    if k.endswith("num_batches_tracked"):  # not kept by the import: written as 0
      assert back[k].dtype == torch.int64 and back[k].shape == () and int(back[k]) == 0
    else:
      assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_nmf_rank_survives_jax_pth_jax(torch_ref_t, tmp_path):
  """The rank is not a tensor shape: meta['cfg'] carries it (MD_R) back into the importer."""
  conv = command("from_torch")
  assert conv.main([str(torch_ref_t.path), "-o", str(tmp_path / "r32"), "--nmf-rank", "32"]) == 0
  assert command("to_torch").main([str(tmp_path / "r32"), "-o", str(tmp_path / "r32.pth")]) == 0
  assert conv.main([str(tmp_path / "r32.pth"), "-o", str(tmp_path / "again"), "--nmf-seed", "9"]) == 0
  model, again = load_checkpoint(tmp_path / "again")
  assert model.nmf_rank == 32
  # ... and the fixed NMF bases come back as they were, whatever --nmf-seed says.
  bases = lambda v: np.asarray(v["nmf_bases"]["decode_head"]["hamburger"]["bases"])
  np.testing.assert_array_equal(bases(again), bases(load_checkpoint(tmp_path / "r32")[1]))


def test_to_torch_from_a_train_checkpoint(tmp_path):
  """A train.py-layout checkpoint (later step, optimizer state, class names) of a non-paper size."""
  from segnext_jax import checkpoint, segnext
  model_kw = dict(TINY, num_classes=6, nmf_rank=8)
  variables = random_variables(segnext("t", **model_kw))
  meta = dict(variant="t", model=model_kw, class_names=[f"c{i}" for i in range(6)],
              palette=[[i, i, i] for i in range(6)], config={"steps": 7})
  with checkpoint.manager(tmp_path / "run", create=True) as mngr:
    checkpoint.save(mngr, 7, variables, meta, opt={"count": np.int32(7)})
    mngr.wait_until_finished()
  pth = tmp_path / "run.pth"
  assert command("to_torch").main([str(tmp_path / "run"), "-o", str(pth)]) == 0
  segmentor, obj = mmseg_from_pth(pth)
  assert obj["meta"]["segnext_jax"]["step"] == 7 and obj["meta"]["dataset_meta"]["classes"][5] == "c5"
  x = images(2, 64, 96)
  want = jax_reference(*load_checkpoint(tmp_path / "run"))(x)
  np.testing.assert_allclose(mmseg_logits(segmentor, obj, x), want, rtol=0, atol=FP32_ATOL)


def test_backbone_only_round_trip(torch_ref_t, tmp_path):
  """An ImageNet-style MSCAN .pth (bare keys) -> jax -> bare keys, loading strictly into MSCAN."""
  import torch
  sd = torch_ref_t.backbone.state_dict()
  torch.save({"state_dict": sd}, tmp_path / "mscan.pth")
  assert command("from_torch").main([str(tmp_path / "mscan.pth"), "-o", str(tmp_path / "ck")]) == 0
  assert command("to_torch").main([str(tmp_path / "ck"), "-o", str(tmp_path / "b.pth")]) == 0
  obj = torch.load(tmp_path / "b.pth", weights_only=True)
  assert obj["meta"]["cfg"].startswith("backbone = {'type': 'MSCAN'")
  assert list(obj["state_dict"]) == sorted(sd)
  assert all(torch.equal(obj["state_dict"][k], t) for k, t in sd.items() if "num_batches" not in k)
  mmseg_segmentor_modules("t")[0].load_state_dict(obj["state_dict"], strict=True)


def test_cli_errors(tmp_path, capsys):
  assert command("export").main([str(tmp_path), "--format", "onnx", "-o", str(tmp_path / "x")]) == 2
  assert command("to_torch").main([str(tmp_path), "-o", str(tmp_path / "x.pth")]) == 2
  assert "not a segnext-jax checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["s", "b", "l"])
def test_pth_jax_pth_bit_exact_every_variant(variant, tmp_path):
  import torch
  ref = TorchReference(variant, tmp_path)
  assert command("from_torch").main([str(ref.path), "-o", str(tmp_path / "ck")]) == 0
  assert command("to_torch").main([str(tmp_path / "ck"), "-o", str(tmp_path / "b.pth")]) == 0
  orig = torch.load(ref.path, weights_only=True)["state_dict"]
  back = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
  assert sorted(orig) == list(back)
  assert all(torch.equal(back[k], t) for k, t in orig.items() if "num_batches" not in k)


@pytest.mark.slow
def test_l_exports_match_jax(tmp_path):
  """SegNeXt-L through both formats at one size (the export itself takes minutes on CPU)."""
  import onnxruntime as ort
  from jax import export
  ref = TorchReference("l", tmp_path)
  ck = tmp_path / "ck"
  assert command("from_torch").main([str(ref.path), "-o", str(ck)]) == 0
  cli = command("export")
  for fmt in ("onnx", "stablehlo"):
    assert cli.main([str(ck), "--format", fmt, "-o", str(tmp_path / f"l.{fmt}")]) == 0
  x = images(1, 64, 96)
  want = jax_reference(*load_checkpoint(ck))(x)
  sess = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
  shlo = export.deserialize(bytearray((tmp_path / "l.stablehlo").read_bytes()))
  for got in (sess.run(None, {"images": x})[0], np.asarray(shlo.call(x))):
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
