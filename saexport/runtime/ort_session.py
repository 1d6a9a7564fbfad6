"""ONNX Runtime sessions for exported graphs, with `BlockSparseAttention` served by onnxruntime-extensions.

The custom op runs the project's reference implementation (`reference_block_sparse_attention`) on
the CPU, so ONNX Runtime checks the graph around the node for real; it is a correctness back end,
not a fast one. PyOp binds one element type per op: fp32, the type the CPU back end runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from saexport.errors import SaexportError
from saexport.models.attention_op import reference_block_sparse_attention
from saexport.models.onnx_op import OP_TYPE

_registered = False
_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
                ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException)


def _register_custom_op() -> None:
    global _registered
    if _registered:
        return

    @onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_int32] * 3,
        outputs=[PyCustomOpDef.dt_float],
        attrs={
            "plugin_version": PyCustomOpDef.dt_string,
            "plugin_namespace": PyCustomOpDef.dt_string,
            "num_heads": PyCustomOpDef.dt_int64,
            "head_dim": PyCustomOpDef.dt_int64,
            "block_size": PyCustomOpDef.dt_int64,
            "scale": PyCustomOpDef.dt_float,
        },
    )
    def block_sparse_attention(q, k, v, topology, budgets, step_index, **attrs) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v, topology, budgets, step_index)]
        out = reference_block_sparse_attention(*tensors, int(attrs["block_size"]), float(attrs["scale"]))
        return out.numpy()

    _registered = True


def ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    _register_custom_op()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _LOAD_ERRORS as e:
        raise SaexportError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]}): export it again with "
                            "`saexport export --dtype fp32`") from None


def run_dit(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Run an exported DiT on (hidden_states, timestep, encoder_hidden_states, step_index)."""
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(names, inputs, strict=True)})
    return torch.from_numpy(out)
