"""The key map covers every variant and custom sizes, and bad checkpoints fail with one line and
write nothing."""
from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from conftest import (FP32_ATOL, TINY, TorchReference, command, mmseg_segmentor_modules,
                      segmentor_state_dict)
from flax import traverse_util

from segnext_jax import checkpoint, convert_map, load_checkpoint, random_bases, torch_io
from segnext_jax.model import abstract_variables, segnext

def run_cli(*args: str) -> subprocess.CompletedProcess:
  """convert/from_torch.py's command, run in this process (no interpreter, JAX and torch start
  per call): its exit status, stdout and stderr."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = command("from_torch").main([str(a) for a in args])
  return subprocess.CompletedProcess(["convert/from_torch.py", *map(str, args)], code,
                                     out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def sd_t() -> dict:
  torch.manual_seed(0)
  return segmentor_state_dict(*mmseg_segmentor_modules("t"))


def shapes_only(variant: str) -> dict:
  backbone, head = mmseg_segmentor_modules(variant)
  return {k: np.zeros(v.shape, np.float32) for k, v in segmentor_state_dict(backbone, head).items()}


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_every_key_of_every_variant_maps(variant):
  sd = shapes_only(variant)
  assert convert_map.infer_model(sd) == (variant, {}, 150)  # a released size: no overrides
  variables, ignored = convert_map.convert_state_dict(sd, abstract_variables(segnext(variant)))
  assert all(k.endswith("num_batches_tracked") for k in ignored)
  target = abstract_variables(segnext(variant))
  n_target = len(traverse_util.flatten_dict({c: target[c] for c in convert_map.MAPPED_COLLECTIONS}))
  assert len(traverse_util.flatten_dict(variables)) == n_target == len(sd) - len(ignored)


def test_conv_kernel_is_transposed_and_bn_goes_to_batch_stats(sd_t):
  variables, _ = convert_map.convert_state_dict(sd_t, abstract_variables(segnext("t")))
  w = sd_t["backbone.block1.0.attn.spatial_gating_unit.conv2_1.weight"].numpy()  # (C,1,1,21)
  got = variables["params"]["backbone"]["block1_0"]["attn"]["spatial_gating_unit"]["conv2_1"]["kernel"]
  np.testing.assert_array_equal(got, w.transpose(2, 3, 1, 0))
  rv = sd_t["backbone.patch_embed2.norm.running_var"].numpy()
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["patch_embed2"]["norm"]["var"], rv)


def test_official_repo_alias_and_backbone_only(sd_t):
  official = {k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv."): v for k, v in sd_t.items()}
  assert convert_map.detect_format(official) == "official SegNeXt segmentor"
  a, _ = convert_map.convert_state_dict(official, abstract_variables(segnext("t")))
  backbone = {k[len("backbone."):]: v for k, v in sd_t.items() if k.startswith("backbone.")}
  backbone.update({"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
  assert convert_map.detect_format(backbone) == "mmseg MSCAN backbone"
  b, ignored = convert_map.convert_state_dict(backbone, abstract_variables(segnext("t")), backbone_only=True)
  assert {"head.weight", "head.bias"} <= set(ignored)
  assert "decode_head" not in b["params"]
  np.testing.assert_array_equal(a["params"]["backbone"]["block1_0"]["mlp"]["dwconv"]["kernel"],
                                b["params"]["backbone"]["block1_0"]["mlp"]["dwconv"]["kernel"])


def _write(tmp_path: Path, sd: dict, name: str = "ck.pth") -> Path:
  path = tmp_path / name
  torch.save({"meta": {}, "state_dict": sd}, path)
  return path


def _assert_fails(tmp_path: Path, ckpt: Path, *needles: str, extra: tuple = ()) -> str:
  out = tmp_path / "out"
  res = run_cli(ckpt, "-o", out, *extra)
  assert res.returncode != 0
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
  for n in needles:
    assert n in lines[0], (n, lines[0])
  assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
  return lines[0]


def test_cli_missing_tensor(tmp_path, sd_t):
  sd = dict(sd_t)
  del sd["backbone.block2.1.mlp.fc2.weight"]
  _assert_fails(tmp_path, _write(tmp_path, sd), "1 missing", "backbone/block2_1/mlp/fc2/kernel")


def test_cli_unexpected_tensor(tmp_path, sd_t):
  sd = dict(sd_t, **{"decode_head.extra.weight": torch.zeros(3)})
  _assert_fails(tmp_path, _write(tmp_path, sd), "1 unexpected", "decode_head.extra.weight")


def test_cli_misshaped_tensor(tmp_path, sd_t):
  sd = dict(sd_t, **{"decode_head.align.conv.weight": torch.zeros(256, 255, 1, 1)})
  _assert_fails(tmp_path, _write(tmp_path, sd), "mis-shaped", "decode_head.align.conv.weight")


def test_cli_truncated_and_non_checkpoint_files(tmp_path, sd_t):
  good = _write(tmp_path, sd_t, "good.pth")
  bad = tmp_path / "trunc.pth"
  bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  _assert_fails(tmp_path, bad, "trunc.pth", "not a readable torch checkpoint")
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  _assert_fails(tmp_path, text, "notes.txt")
  _assert_fails(tmp_path, tmp_path / "absent.pth", "no such file")


def test_cli_pickle_needs_trust(tmp_path, sd_t):
  path = tmp_path / "pickled.pth"
  torch.save({"state_dict": sd_t, "meta": {"cfg": Path("x")}}, path)  # a non-tensor object
  _assert_fails(tmp_path, path, "--trust-pickle")
  res = run_cli(path, "-o", tmp_path / "ok", "--trust-pickle")
  assert res.returncode == 0, res.stderr


def test_cli_variant_must_agree(tmp_path, sd_t):
  _assert_fails(tmp_path, _write(tmp_path, sd_t), "variant 't'", extra=("--variant", "l"))


def test_cli_writes_checkpoint_with_metadata(tmp_path, sd_t):
  path = _write(tmp_path, sd_t)
  res = run_cli(path, "-o", tmp_path / "conv", "--variant", "t")
  assert res.returncode == 0, res.stderr
  assert "mmseg segmentor: variant t, num_classes 150" in res.stdout
  assert "NMF rank 16 (no stored config" in res.stdout
  model, tree, meta = checkpoint.load(tmp_path / "conv")
  assert meta["variant"] == "t" and meta["model"] == {"nmf_rank": 16, "num_classes": 150}
  assert len(meta["source_sha256"]) == 64 and model.nmf_rank == 16
  np.testing.assert_array_equal(tree["params"]["decode_head"]["conv_seg"]["bias"],
                                sd_t["decode_head.conv_seg.bias"].numpy())
  bases = np.asarray(tree["nmf_bases"]["decode_head"]["hamburger"]["bases"])
  assert bases.shape == (256, 16) and np.allclose(np.linalg.norm(bases, axis=0), 1.0, atol=1e-6)
  assert run_cli(path, "-o", tmp_path / "conv").returncode != 0  # refuses to overwrite


OFFICIAL_B_CONFIG = """model = dict(type='EncoderDecoder', decode_head=dict(type='LightHamHead',
    in_channels=[128, 320, 512], channels=512, ham_channels=512, ham_kwargs=dict(MD_R=16)))"""


@pytest.mark.parametrize("fmt,config,flag,want", [
    ("official", None, None, 64),                                   # official B/L: Hamburger default
    ("official", OFFICIAL_B_CONFIG, None, 16),                      # the stored config wins
    ("official", OFFICIAL_B_CONFIG.replace("MD_R=16", "MD_S=1"), None, 64),  # config without MD_R
    ("mmseg", None, None, 16),                                      # mmseg 1.x configs: 16
    ("mmseg", "model = dict(decode_head=dict(ham_kwargs=dict(MD_S=1, MD_R=32)))", None, 32),
    ("official", None, 8, 8),                                       # --nmf-rank overrides
])
def test_nmf_rank_from_stored_config_or_format(tmp_path, fmt, config, flag, want):
  sd = {k: torch.from_numpy(v) for k, v in shapes_only("b").items()}
  if fmt == "official":
    sd = {k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv."): v for k, v in sd.items()}
  path = tmp_path / "b.pth"
  torch.save({"meta": {"config": config} if config else {}, "state_dict": sd}, path)
  variables, meta, report = torch_io.convert_file(path, nmf_rank=flag)
  assert report.variant == "b" and meta["model"]["nmf_rank"] == report.nmf_rank == want, report
  assert variables["nmf_bases"]["decode_head"]["hamburger"]["bases"].shape == (512, want)
  if flag is None and config is None and fmt == "official":
    assert "official SegNeXt segmentor B configs use 64" in report.nmf_rank_source


def test_mmengine_cfg_key_is_read():
  assert convert_map.stored_config({"meta": {"cfg": "ham_kwargs=dict(MD_R=16)"}}) == "ham_kwargs=dict(MD_R=16)"
  assert convert_map.nmf_rank("'MD_R': 48", "official SegNeXt segmentor", "l")[0] == 48


@pytest.fixture(scope="module")
def ref_tiny(tmp_path_factory) -> TorchReference:
  """mmseg's own SegNeXt at TINY's sizes (no released variant's), random weights, as a .pth."""
  return TorchReference("t", tmp_path_factory.mktemp("ref_tiny"), **TINY)


def test_custom_size_converts_and_matches_mmseg(ref_tiny, tmp_path, capsys):
  """A custom-size checkpoint converts on base 't' with its sizes in meta['model'], loads as that
  model and gives mmseg's own stage maps and logits (eval mode, same NMF bases)."""
  out = tmp_path / "conv"
  assert command("from_torch").main([str(ref_tiny.path), "-o", str(out)]) == 0
  assert ("mmseg segmentor: custom size (embed_dims (8, 16, 32, 32), depths (1, 1, 1, 1), "
          "head_channels 32) on variant t, num_classes 150" in capsys.readouterr().out)
  model, variables = load_checkpoint(out)
  meta = checkpoint.read_meta(out)
  assert meta["variant"] == "t" and meta["model"] == {
      "nmf_rank": 16, "num_classes": 150, **{k: list(v) if isinstance(v, tuple) else v
                                             for k, v in TINY.items()}}
  assert (tuple(model.embed_dims), tuple(model.depths), model.head_channels) == (
      TINY["embed_dims"], TINY["depths"], TINY["head_channels"])
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 45, 61, 3)).astype(np.float32)  # odd size: the padding paths
  bases = np.asarray(random_bases(jax.random.key(3), 2, model.head_channels, model.nmf_rank))
  feats_t, logits_t = ref_tiny.forward(images, bases)
  logits, state = jax.jit(lambda v, x, b: model.apply(v, x, train=False, nmf_bases=b,
                                                      mutable=["intermediates"]))(variables, images, bases)
  stages = [state["intermediates"]["backbone"][f"stage{s}"][0] for s in range(1, 5)]
  for s, (a, b) in enumerate(zip(stages, feats_t), 1):
    assert a.shape == b.shape and a.shape[-1] == TINY["embed_dims"][s - 1], (s, a.shape, b.shape)
    err = float(np.max(np.abs(np.asarray(a) - b)))
    assert err <= FP32_ATOL, f"stage {s}: max abs err {err:.2e} (scale {np.abs(b).max():.2f})"
  assert logits.shape == logits_t.shape == (2, 6, 8, 150)
  err = float(np.max(np.abs(np.asarray(logits) - logits_t)))
  assert err <= FP32_ATOL, f"logits: max abs err {err:.2e} (scale {np.abs(logits_t).max():.2f})"
  assert command("to_torch").main([str(out), "-o", str(tmp_path / "back.pth")]) == 0  # and back
  orig = torch.load(ref_tiny.path, weights_only=True)["state_dict"]
  back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
  assert sorted(orig) == list(back)
  assert all(torch.equal(back[k], t) for k, t in orig.items() if "num_batches" not in k)


def test_custom_size_base_and_backbone_only(ref_tiny, tmp_path):
  """--variant names a custom size's base; a bare custom MSCAN records embed_dims and depths (its
  head channels are no tensor's)."""
  _, meta, report = torch_io.convert_file(ref_tiny.path, variant="s")
  assert meta["variant"] == report.variant == "s" and meta["model"]["embed_dims"] == TINY["embed_dims"]
  path = tmp_path / "mscan_tiny.pth"
  torch.save({"state_dict": ref_tiny.backbone.state_dict()}, path)
  variables, meta, report = torch_io.convert_file(path)
  assert report.backbone_only and report.custom_size == {
      "embed_dims": TINY["embed_dims"], "depths": TINY["depths"]}
  assert meta["model"] == {"nmf_rank": 16, **report.custom_size}
  assert "decode_head" not in variables["params"]


def test_cli_inconsistent_custom_size(ref_tiny, tmp_path):
  """A tensor that disagrees with the one that sets the same size is named, not every tensor
  built from the wrong size."""
  sd = dict(torch.load(ref_tiny.path, weights_only=True)["state_dict"])
  sd["backbone.norm2.weight"] = torch.zeros(24)
  _assert_fails(tmp_path, _write(tmp_path, sd), "inconsistent shapes",
                "backbone.norm2.weight (24,)", "backbone.patch_embed2.norm.weight (16,)")


@pytest.mark.parametrize("change,needles", [
    ({"decode_head.squeeze.conv.weight": (48, 80, 1, 1), "decode_head.squeeze.gn.weight": (48,)},
     ("decode_head.squeeze.conv.weight (48, 80, 1, 1)", "not a multiple", "32")),
    ({"decode_head.squeeze.gn.weight": (64,)},
     ("inconsistent shapes", "decode_head.squeeze.gn.weight (64,)")),
    ({"decode_head.align.conv.weight": (32, 31, 1, 1)},
     ("1 mis-shaped", "decode_head.align.conv.weight")),
    ({"backbone.block3.0.mlp.fc1.weight": (100, 32, 1, 1)},
     ("mis-shaped", "backbone.block3.0.mlp.fc1.weight")),
])
def test_custom_size_bad_shapes_fail_in_one_line(ref_tiny, tmp_path, change, needles):
  """Head channels GroupNorm cannot take, a head tensor disagreeing with the one the size is read
  from, and tensors that do not fit the inferred custom size: one line naming the tensor."""
  sd = dict(torch.load(ref_tiny.path, weights_only=True)["state_dict"])
  sd.update({k: torch.zeros(shape) for k, shape in change.items()})
  with pytest.raises(convert_map.ConversionError) as e:
    torch_io.convert_file(_write(tmp_path, sd))
  msg = str(e.value)
  assert "\n" not in msg and all(n in msg for n in needles), msg
