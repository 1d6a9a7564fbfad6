"""The `BlockSparseAttention` ONNX node (docs/ARCHITECTURE.md, "The ONNX node"): its schema and its translation.

The node lives in the `ai.onnx.contrib` domain, where the project's custom-op library for ONNX Runtime
(`libsaexport_ort_ops.so`, plugins/ort) serves it, so the exported file runs unchanged in ONNX Runtime; TensorRT's
parser ignores the domain and finds the plugin by `op_type`, `plugin_version` and `plugin_namespace`. Registering
the schema lets onnxscript build the node and `onnx.checker` type-check it.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema

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


def translation_table() -> dict:
    """What `torch.onnx.export(custom_translation_table=...)` needs to write the node."""
    import torch

    from saexport.models import attention_op  # noqa: F401  (registers the op)

    return {torch.ops.saexport.block_sparse_attention.default: _translate}
