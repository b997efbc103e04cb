"""SegNeXt inference as one compiled program per kind of part instead of one per network.

XLA compiles a program in time proportional to its fusions, and a whole-network program holds
every block's, compiled again at each new input shape: most of an evaluation with test-time
augmentation (6 new shapes per image size). The blocks of a stage are equal, so here they share
one program: a new shape compiles the stem, 3 patch embeds, 4 blocks, 4 norms and the head
(`benchmarks/gpu.py` times both ways; docs/performance.md#evaluation has the CPU numbers).

How: the model's own forward runs (`model.apply(train=False)`, in Python), and each call of one
of its parts (`model.is_part`) is routed, by flax's method interception, to a jitted program of
that part: the module's definition without its name and its variables (`unbind`), its arrays
as arguments, its flags static. Parts of equal definition and input shapes share a program.
Nothing here restates the network: a layer added to the backbone or the head is staged as it
is. Why this way: the forward's walk (per stage: embed, blocks, norm; then the head on stages
2-4) is written once, in the modules' `__call__`, and runs unchanged. A parts list, or `setup`
attributes bound and unbound here, would need that walk a second time, here or in a runner the
model's code is rewritten around. The cost is Python: flax builds the module tree per call, a
fixed cost per part, small next to a 512x512 image's compute (docs/performance.md).

`StagedForward(model)(variables, images, valid)` runs it; `.lower(...).compile()` compiles every
part ahead (abstract arguments), as `jax.jit(f).lower(...).compile()` does for one program.
The programs are the process's, not one forward's: another StagedForward of a model with the
same parts (a second evaluation, eval.py's main called again in one process) finds them traced
and compiled.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from segnext_jax import backend
from segnext_jax.model import SegNeXt, is_part

_ARRAY = "<array>"  # a part's argument passed to its program (the others are static)
# A part's call as (program, variables, array arguments) -> output: run it, or lower it.
Run = Callable[[Callable, dict, list], Any]

# Every part's jitted program in this process, by the part's definition, its static arguments and
# the backend policy its trace reads (depthwise implementation); jax keeps each one's compiled
# shapes.
_PROGRAMS: dict[tuple, Callable] = {}
_PROGRAMS_LOCK = threading.Lock()  # evaluation lowers in background threads while it runs


@dataclasses.dataclass
class Lowered:
  """The distinct programs of a forward, lowered; `compile()` compiles them all."""
  parts: list

  def compile(self) -> None:
    for p in self.parts:
      p.compile()


class StagedForward:
  """(variables, images (B,H,W,3), valid (B,2) int32 or None) -> stride-8 logits, as the model."""

  def __init__(self, model: SegNeXt):
    self.model = model

  def __call__(self, variables: dict, images: jax.Array,
               valid: jax.Array | None = None) -> jax.Array:
    sharding = _committed_sharding(variables)
    if sharding is not None:  # every part's arguments committed there, as `lower` assumes
      images, valid = jax.device_put((images, valid), sharding)
    with nn.intercept_methods(self._interceptor(lambda program, v, arrays: program(v, arrays))):
      return self.model.apply(variables, images, train=False, valid=valid)

  def lower(self, variables: dict, images: jax.ShapeDtypeStruct, valid: Any = None) -> Lowered:
    """Every part lowered for abstract inputs (each distinct program once)."""
    done: dict[tuple, Any] = {}
    sharding = _committed_sharding(variables)

    def run(program, v, arrays):
      key = (program, str(jax.tree.map(lambda a: (a.shape, a.dtype), (v, arrays))))
      if key not in done:
        done[key] = program.lower(*jax.tree.map(lambda a: _abstract(a, sharding), (v, arrays)))
      return program(v, arrays)  # under eval_shape: abstract outputs for the next part

    forward = lambda v, x, val: self.model.apply(v, x, train=False, valid=val)
    with nn.intercept_methods(self._interceptor(run)):
      jax.eval_shape(forward, variables, images, valid)
    return Lowered(list(done.values()))

  def _interceptor(self, run: Run) -> Callable:
    policy = backend.policy()  # read once per forward, not per part
    def intercept(next_fun, args, kwargs, context):
      if context.method_name != "__call__" or not is_part(context.module):
        return next_fun(*args, **kwargs)
      leaves, tree = jax.tree.flatten((args, kwargs))
      arrays = [x for x in leaves if _is_array(x)]
      statics = tuple(_ARRAY if _is_array(x) else x for x in leaves)
      program = self._program(context.module, tree, statics, policy)
      return run(program, context.module.variables, arrays)
    return intercept

  def _program(self, part: nn.Module, tree: Any, statics: tuple,
               policy: backend.Policy) -> Callable:
    """The jitted program of a part: (variables, its array arguments) -> its output. Keyed by
    the part's fields (its definition, not its name), its static arguments and the policy its
    trace reads."""
    fields = tuple(getattr(part, f.name) for f in dataclasses.fields(part)
                   if f.name not in ("parent", "name"))
    key = (type(part), fields, tree, statics, policy)
    with _PROGRAMS_LOCK:
      if key not in _PROGRAMS:
        module = part.unbind()[0]
        def program(variables: dict, arrays: list) -> Any:
          it = iter(arrays)
          args, kwargs = jax.tree.unflatten(tree, [next(it) if s is _ARRAY else s for s in statics])
          return module.apply(variables, *args, **kwargs)
        program.__name__ = program.__qualname__ = type(part).__name__  # jit(MSCABlock) in logs
        _PROGRAMS[key] = jax.jit(program)
      return _PROGRAMS[key]


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _abstract(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _committed_sharding(variables: dict) -> Any:
  """The one sharding of `variables` if they are committed arrays (checkpoint.load's): a call
  with them commits every part's arguments there, so the parts are lowered for it."""
  leaves = [x for x in jax.tree.leaves(variables) if isinstance(x, jax.Array)]
  if not leaves or not all(x.committed for x in leaves):
    return None
  shardings = {x.sharding for x in leaves}
  return shardings.pop() if len(shardings) == 1 else None
