"""Deployment exports of a SegNeXt: ONNX (onnxruntime) or serialized StableHLO.

One input: float32 NHWC normalized images (B, H, W, 3), B, H and W dynamic (H, W multiples of 32).
One output: logits (B, H/8, W/8, K), the numbers of `model.apply(variables, images, train=False)`.
The weights and the fixed NMF bases are constants of the graph: exported inference is
deterministic. StableHLO reloads with `jax.export.deserialize` alone (no flax, no segnext_jax).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
from jax import export as jax_export

from segnext_jax.checkpoint import load
from segnext_jax.data.transforms import MEAN, STD
from segnext_jax.errors import optional
from segnext_jax.ham_head import FIXED_BASES
from segnext_jax.model import LOGIT_STRIDE, TOTAL_STRIDE, SegNeXt

# jax.export symbolic input dims: H and W are multiples of the network's total stride
SHAPE = f"b, {TOTAL_STRIDE}*h, {TOTAL_STRIDE}*w"
OPSET = 18  # the lowest jax2onnx 0.13 emits valid graphs for (17: ReduceSumSquare with axes input)
FORMATS = ("onnx", "stablehlo")
# x (..., C) @ w (C, D) as jax2onnx writes a 1x1 conv: 'abcd,de->abce'.
MATMUL_EINSUM = re.compile(r"^([a-z]+)([a-z]),\2([a-z])->\1\3$")


def input_spec() -> jax.ShapeDtypeStruct:
  """(B, 32h, 32w, 3) float32 with symbolic b, h, w (32: TOTAL_STRIDE)."""
  b, h, w = jax_export.symbolic_shape(SHAPE)
  return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)


def inference_fn(model: SegNeXt, variables: dict) -> Callable[[jax.Array], jax.Array]:
  """images -> logits with the variables (incl. the fixed NMF bases) closed over as constants."""
  if FIXED_BASES not in variables:
    raise ValueError(f"the checkpoint has no '{FIXED_BASES}': nothing fixes NMF's initial bases")
  return lambda images: model.apply(variables, images, train=False)


def dw_impl(fmt: str, platforms: tuple[str, ...]) -> str:
  """Depthwise conv backend: the shift loop for CPU-only StableHLO (the CPU's choice, see
  depthwise.py), the grouped conv elsewhere (onnxruntime's depthwise Conv, cuDNN, TPU)."""
  return "shift" if fmt == "stablehlo" and platforms == ("cpu",) else "lax"


def export_stablehlo(model: SegNeXt, variables: dict, platforms: tuple[str, ...]) -> bytes:
  """jax.export with symbolic batch/height/width, serialized."""
  exported = jax_export.export(jax.jit(inference_fn(model, variables)), platforms=platforms)(
      input_spec())
  return bytes(exported.serialize())


def export_onnx(model: SegNeXt, variables: dict, opset: int = OPSET):
  """jax2onnx of the traced program (an onnx.ModelProto).

  The function is traced to a jaxpr first: jax2onnx replaces `jax.image.resize` by its own
  primitive, which needs static sizes; the traced jaxpr holds resize's lax ops, whose sizes follow
  the symbolic input."""
  for name in ("jax2onnx", "onnx_ir"):  # plugins for other libraries, shape-inference chatter
    logging.getLogger(name).setLevel(logging.ERROR)
  to_onnx = optional("jax2onnx", "export", "ONNX export").to_onnx
  spec = input_spec()  # one symbolic scope for the trace and the conversion
  closed = jax.make_jaxpr(inference_fn(model, variables))(spec)
  program = lambda images: jax.extend.core.jaxpr_as_fun(closed)(images)[0]
  return to_onnx(program, [spec], model_name="segnext", opset=opset,
                 input_names=["images"], output_names=["logits"])


def einsums_to_matmul(proto) -> int:
  """Rewrite trailing-axis Einsums as MatMul (the same product, numpy broadcasting): onnxruntime
  runs the 1x1 convs faster as MatMul (docs/performance.md; benchmarks/export_latency.py times
  the exported file). Returns the count."""
  count = 0
  for node in proto.graph.node:
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    m = MATMUL_EINSUM.match(eq) if node.op_type == "Einsum" else None
    if m and m.group(3) not in m.group(1) + m.group(2):
      node.op_type = "MatMul"
      del node.attribute[:]
      count += 1
  return count


def onnx_metadata(proto, meta: dict) -> None:
  """What a deployment needs besides the graph, as ONNX metadata_props."""
  mean, std = (a.astype(float).round(3).tolist() for a in (MEAN, STD))
  info = dict(variant=meta["variant"], num_classes=meta.get("model", {}).get("num_classes"),
              input=("float32 NHWC (B,H,W,3), RGB, (x - mean) / std, H and W padded to "
                     f"/{TOTAL_STRIDE}"),
              mean=mean, std=std, output=f"logits (B,H/{LOGIT_STRIDE},W/{LOGIT_STRIDE},K)",
              class_names=json.dumps(meta.get("class_names")))
  for k, v in info.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = k, str(v)


def write_onnx(model: SegNeXt, variables: dict, meta: dict, out: Path, opset: int) -> None:
  """export_onnx, its 1x1-conv Einsums as MatMul, metadata, and the oldest IR version that has the
  opset (onnx writes its newest; IR 8 for opset 18 loads in onnxruntime >= 1.15)."""
  onnx = optional("onnx", "export", "ONNX export")
  proto = export_onnx(model, variables, opset)
  einsums_to_matmul(proto)
  onnx_metadata(proto, meta)
  proto.ir_version = onnx.helper.find_min_ir_version_for(proto.opset_import, ignore_unknown=True)
  onnx.save(proto, out)


def export_file(ckpt: str | Path, fmt: str, out: str | Path, opset: int = OPSET,
                platforms: tuple[str, ...] | None = None) -> Path:
  """Load CKPT and write its `fmt` export to `out`."""
  platforms = tuple(platforms or (jax.default_backend(),))
  model, variables, meta = load(ckpt, dw_impl=dw_impl(fmt, platforms))
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if fmt == "stablehlo":
    out.write_bytes(export_stablehlo(model, variables, platforms))
  else:
    write_onnx(model, variables, meta, out, opset)
  return out
