"""The `BlockSparseAttention` ONNX node (docs/ARCHITECTURE.md, "The ONNX node"): its schema and its translation;
and the translation of the RMS norms around it into the form ONNX Runtime fuses.

The node lives in the `ai.onnx.contrib` domain, where the project's custom-op library for ONNX Runtime
(`libsaexport_ort_ops.so`, plugins/ort) serves it, so the exported file runs unchanged in ONNX Runtime; TensorRT's
parser ignores the domain and finds the plugin by `op_type`, `plugin_version` and `plugin_namespace`. Registering
the schema lets onnxscript build the node and `onnx.checker` type-check it.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset20 as op

OP_TYPE = "BlockSparseAttention"
DOMAIN = "ai.onnx.contrib"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""


def register_schema() -> None:
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    onnx.defs.register_schema(
        OpSchema(
            OP_TYPE,
            DOMAIN,
            1,
            doc="Block-sparse attention with a frozen per-head threshold map and per-step budgets.",
            inputs=[
                param("q", "T", "[batch, L, heads, head_dim]"),
                param("k", "T", "[batch, L, heads, head_dim]"),
                param("v", "T", "[batch, L, heads, head_dim]"),
                param("topology", "tensor(int32)", "packed levels [heads, n, ceil(n/4)]"),
                param("budgets", "tensor(int32)", "levels [steps, heads]"),
                param("step_index", "tensor(int32)", "[1]"),
            ],
            outputs=[param("out", "T", "[batch, L, heads, head_dim]")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
            attributes=[
                attr("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
                attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                attr("num_heads", OpSchema.AttrType.INT, ""),
                attr("head_dim", OpSchema.AttrType.INT, ""),
                attr("block_size", OpSchema.AttrType.INT, "tokens per block"),
                attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
            ],
        )
    )


register_schema()
_opset = onnxscript.values.Opset(DOMAIN, 1)


def _translate(q, k, v, topology, budgets, step_index, block_size: int, scale: float):
    """torch.onnx translation of `saexport::block_sparse_attention` (the op's schema: the node's inputs and
    attributes one for one)."""
    return _opset.BlockSparseAttention(
        q, k, v, topology, budgets, step_index,
        plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
        num_heads=int(q.shape[2]), head_dim=int(q.shape[3]), block_size=block_size, scale=float(scale),
    )


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    """`aten.rms_norm` (Wan's q/k norms) as x / sqrt(mean(x^2) + eps) in fp32, rounded to x's precision, times the
    weight in it: the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization kernel. torch.onnx's own
    decomposition writes x * Reciprocal(Sqrt(...)) and the weight in fp32, which it leaves as eight kernels and two
    passes in fp32 (80 ms of a 480 ms bf16 Wan2.1-1.3B forward in its CUDA provider, docs/BENCHMARKS.md). The
    weight is applied after the rounding (torch applies Wan's fp32 weight before it): one more rounding in bf16 or
    fp16, none in fp32."""
    import torch

    axes = op.Constant(value_ints=list(range(-len(normalized_shape), 0)))
    wide = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=int(ir.DataType.FLOAT))
    variance = op.ReduceMean(op.Pow(wide, op.Constant(value_float=2.0)), axes, keepdims=1)
    epsilon = torch.finfo(torch.float32).eps if eps is None else float(eps)
    normalized = op.Div(wide, op.Sqrt(op.Add(variance, op.Constant(value_float=epsilon))))
    if x.dtype != ir.DataType.FLOAT:
        normalized = op.Cast(normalized, to=int(x.dtype))
    if weight is None:
        return normalized
    return op.Mul(normalized, weight if weight.dtype == x.dtype else op.Cast(weight, to=int(x.dtype)))


def translation_table() -> dict:
    """What `torch.onnx.export(custom_translation_table=...)` needs to write the node and the RMS norms."""
    import torch

    from saexport.models import attention_op  # noqa: F401  (registers the op)

    return {torch.ops.saexport.block_sparse_attention.default: _translate, torch.ops.aten.rms_norm.default: _rms_norm}
