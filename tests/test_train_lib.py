"""Training: optimizer rules and schedule against mmengine, loss decrease, sharding, exact resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flax import traverse_util

from conftest import TINY_RUN, mmseg_segmentor_modules
from segnext_jax import convert_map, segnext
from segnext_jax.config import TrainConfig, make_config
from segnext_jax.recipes import RECIPES
from segnext_jax.model import abstract_variables
from segnext_jax.optim import lr_schedule, param_group, param_name
from segnext_jax.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def test_param_groups_match_mmengine_constructor():
  """lr and weight decay of every parameter equal what mmengine builds from the mmseg config."""
  import torch
  from mmengine.optim import DefaultOptimWrapperConstructor
  backbone, head = mmseg_segmentor_modules("t")
  seg = torch.nn.Module()
  seg.backbone, seg.decode_head = backbone, head
  cfg = TrainConfig()
  wrapper = DefaultOptimWrapperConstructor(dict(
      type="OptimWrapper",
      optimizer=dict(type="AdamW", lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)),
      paramwise_cfg=dict(custom_keys={"pos_block": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0),
                                      "head": dict(lr_mult=10.0)}))(seg)
  names = {id(p): n for n, p in seg.named_parameters()}
  ref = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups
         for p in g["params"]}
  target = {"params": abstract_variables(segnext("t"))["params"]}
  ours = {}
  for torch_name in ref:
    path, _ = convert_map.map_key(torch_name, traverse_util.flatten_dict(target))
    group, decay = param_group(param_name(path[1:]))
    ours[torch_name] = (cfg.lr * (cfg.head_lr_mult if group == "head_lr" else 1.0),
                        cfg.weight_decay * decay)
  assert len(ref) == len(traverse_util.flatten_dict(target))
  bad = {k: (ours[k], ref[k]) for k in ref if not np.allclose(ours[k], ref[k], rtol=1e-9, atol=0)}
  assert not bad, bad
  no_decay = sorted(k for k, v in ref.items() if v[1] == 0)
  assert "backbone.patch_embed1.proj.1.weight" not in no_decay  # stem BN decays (mmseg quirk)
  assert "backbone.block1.0.norm1.weight" in no_decay and "backbone.norm4.bias" in no_decay


def test_schedule_matches_mmengine_linear_then_poly():
  import torch
  from mmengine.optim.scheduler import LinearLR, PolyLR
  cfg = TrainConfig(steps=120, warmup_steps=15)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
  scheds = [LinearLR(opt, start_factor=1e-6, by_epoch=False, begin=0, end=15),
            PolyLR(opt, power=1.0, eta_min=0.0, by_epoch=False, begin=15, end=120)]
  ours = lr_schedule(cfg)
  for step in range(120):
    assert abs(float(ours(step)) - opt.param_groups[0]["lr"]) <= 1e-6 * cfg.lr, step
    opt.step()
    for s in scheds:
      s.step()
  assert float(ours(0)) == pytest.approx(cfg.lr * 1e-6) and float(ours(119)) == 0.0


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
  """conftest's TINY_RUN at 4 steps (test_cli's second step program)."""
  base = dict(TINY_RUN, steps=4, eval_every=1000, ckpt_every=2, workdir=str(tmp_path / "run"))
  return make_config(RECIPES["synthetic"], {**base, **kw})


def _uint8_batch(n: int, size: int = 64) -> dict:
  """Synthetic scenes as the TrainLoader hands them to the step: uint8 pixels and labels, valid sizes."""
  from segnext_jax.data.datasets import Synthetic
  ds = Synthetic(size=size)
  return {"image": np.stack([ds[i][0] for i in range(n)]).astype(np.uint8),
          "label": np.stack([ds[i][1] for i in range(n)]).astype(np.uint8),
          "hw": np.full((n, 2), size, np.int32)}


def test_loss_decreases_on_a_fixed_batch():
  """The trainer's own step (a uint8 batch, normalised in the step) at a higher lr than the recipe's."""
  from segnext_jax.train_lib import build_model, jit_train_step, make_mesh, shard_batch
  from segnext_jax.trainer import initial_state
  cfg = make_config(RECIPES["synthetic"], dict(TINY_RUN, steps=30, lr=3e-3))
  batch = _uint8_batch(4)
  model = build_model(cfg, 6)
  mesh = make_mesh()
  # placed as train_and_evaluate places it: a state on another sharding than the step returns
  # would compile the step a second time at the second call
  state = initial_state(cfg, model, mesh)
  step = jit_train_step(cfg, mesh)
  losses = []
  for _ in range(25):
    state, m = step(state, shard_batch(batch, mesh), jax.random.key(1))
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * losses[0], losses


def test_the_train_step_takes_the_loss_options_of_the_config(monkeypatch):
  """--class-weight and --avg-non-ignore reach the step's loss (traced, not compiled; the loss
  itself is checked against mmseg in test_loss)."""
  from segnext_jax import train_lib
  from segnext_jax.model import abstract_variables
  seen = []
  real = train_lib.seg_cross_entropy

  def recorded(logits, labels, class_weight=None, avg_non_ignore=False):
    seen.append((class_weight, avg_non_ignore))
    return real(logits, labels, class_weight, avg_non_ignore)
  monkeypatch.setattr(train_lib, "seg_cross_entropy", recorded)
  jax.clear_caches()  # an earlier run of the same recipe in this process: traced again here
  batch = jax.eval_shape(lambda: _uint8_batch(2))
  for kw, want in [({}, (None, False)),
                   (dict(class_weight=(1, 2, 3, 4, 5, 6), avg_non_ignore=True),
                    ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), True))]:
    cfg = make_config(RECIPES["synthetic"], dict(TINY_RUN, steps=4, **kw))
    model = train_lib.build_model(cfg, 6)
    state = jax.eval_shape(lambda v: train_lib.create_train_state(cfg, model, v),
                           abstract_variables(model))
    train_lib.jit_train_step(cfg, train_lib.make_mesh()).lower(state, batch, jax.random.key(1))
    assert seen.pop() == want


def test_resume_is_exact(tmp_path):
  straight = train_and_evaluate(_tiny_cfg(tmp_path / "a"), progress=False)
  losses = [l for _, l in straight["history"]["loss"]]
  cfg_b = _tiny_cfg(tmp_path / "b")
  first = train_and_evaluate(cfg_b, stop_after=2, progress=False)  # "killed" after step 2
  assert int(first["state"].step) == 2
  resumed = train_and_evaluate(cfg_b, progress=False)
  assert int(resumed["state"].step) == 4
  assert [l for _, l in resumed["history"]["loss"]] == losses[2:]
  for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
  assert ckpts == ["2", "4"]


def test_pretrained_backbone_loads_loudly(tmp_path, t_variables):
  import torch
  from segnext_jax.pretrained import load_pretrained
  from segnext_jax.mmseg_reference import randomize_
  backbone, _ = mmseg_segmentor_modules("t")
  randomize_(backbone, 3)
  sd = dict(backbone.state_dict(), **{"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
  path = tmp_path / "mscan_t.pth"
  torch.save({"state_dict": sd}, path)
  merged, report = load_pretrained(str(path), t_variables, "t")
  skipped = report.not_in_source
  assert skipped and all(p.split("/")[1] == "decode_head" for p in skipped)
  n_head = len(traverse_util.flatten_dict({"params": t_variables["params"]["decode_head"]}))
  assert len(skipped) == n_head + 1  # + the fixed NMF bases
  assert not report.reinitialised and not report.unused
  assert len(report.loaded) == len(traverse_util.flatten_dict(t_variables)) - n_head - 1
  got = merged["params"]["backbone"]["block2_1"]["attn"]["proj_1"]["kernel"]
  np.testing.assert_array_equal(got, sd["backbone.block2.1.attn.proj_1.weight".removeprefix("backbone.")]
                                .numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(merged["batch_stats"]["backbone"]["patch_embed2"]["norm"]["var"],
                                sd["patch_embed2.norm.running_var"].numpy())
  with pytest.raises(ValueError, match="variant 't', the model is 's'"):
    load_pretrained(str(path), t_variables, "s")


LOWER_SCRIPT = r"""
import hashlib, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from conftest import TINY
from segnext_jax.config import make_config
from segnext_jax.recipes import RECIPES
from segnext_jax.model import abstract_variables
from segnext_jax.train_lib import build_model, create_train_state, jit_train_step, make_mesh
cfg = make_config(RECIPES["synthetic"], dict(model_overrides=TINY, batch_size=2))
model = build_model(cfg, 6)
state = jax.eval_shape(lambda v: create_train_state(cfg, model, v), abstract_variables(model))
batch = dict(image=jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
             label=jax.ShapeDtypeStruct((2, 32, 32), np.int32))
text = jit_train_step(cfg, make_mesh()).lower(state, batch, jax.random.key(1)).as_text()
print(hashlib.sha256(text.encode()).hexdigest())
"""


def test_train_step_program_is_the_same_in_every_process():
  """The persistent compile cache serves a restarted run only if its step lowers to the same
  program: nothing may depend on the process's hash seed (a set's order), nor on whether the
  state is fresh or restored (flax's weakly typed step 0)."""
  procs = [subprocess.Popen([sys.executable, "-c", LOWER_SCRIPT.format(tests=str(REPO / "tests"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)) for seed in ("1", "2", "3")]
  hashes = set()
  for proc in procs:  # side by side: mostly interpreter and import start-up
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    hashes.add(out.split()[-1])
  assert len(hashes) == 1, hashes
  from segnext_jax.train_lib import build_model, create_train_state
  cfg = _tiny_cfg(Path("unused"))
  model = build_model(cfg, 6)
  step = jax.eval_shape(lambda v: create_train_state(cfg, model, v), abstract_variables(model)).step
  assert step.dtype == np.int32 and not step.weak_type  # as restore_state returns it
