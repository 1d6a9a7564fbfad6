"""`saexport verify` and `export --verify`: the exported graph against the PyTorch model it came from, on
polygraphy's runners and Comparator.

Runners, one after the other on the same inputs (random, seeded; the first and the last denoising step): the
PyTorch sparse DiT (the reference, `TorchDiTRunner`) and ONNX Runtime on the fp32 graph (the node served by the
project's custom-op library, `libsaexport_ort_ops.so`). Inputs and outputs can be saved in polygraphy's JSON format.
A TensorRT runner is not here: engines are fp16/bf16 (the plugin's types) while ONNX Runtime runs the fp32 graph,
and no machine of this project runs TensorRT to check one against the other.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc

from saexport.artifacts import OnnxMetadata
from saexport.errors import SaexportError
from saexport.exporter.onnx_export import INPUT_NAMES, OUTPUT_NAMES, build_sparse_dit, example_inputs
from saexport.models.checkpoint import LoadedModel
from saexport.models.video_shape import VideoShape
from saexport.runtime.generation import Artifacts
from saexport.runtime.ort_session import ort_session

ATOL, RTOL = 1e-4, 1e-3  # fp32 on both sides lands near 1e-6 relative


class TorchDiTRunner(BaseRunner):
    """polygraphy runner of the PyTorch sparse DiT (polygraphy's own PytRunner assumes CUDA and tuple outputs)."""

    def __init__(self, module: torch.nn.Module, input_metadata: TensorMetadata, name: str = "torch"):
        super().__init__(name=name, prefix="saexport-torch-runner")
        self.module, self.input_metadata = module.eval(), input_metadata

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[name])) for name in INPUT_NAMES]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.module(*inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAMES[0], out.numpy())])

    def deactivate_impl(self):
        pass


@dataclass
class Verification:
    passed: bool
    max_errors: dict[str, float]  # runner -> max relative error of noise_pred against the reference


def verification_feeds(loaded: LoadedModel, video: VideoShape, steps: int, batch: int, seed: int = 0) -> list[dict]:
    """One feed per checked step (the first and the last): random inputs, never zeros, fp32."""
    torch.manual_seed(seed)
    feeds = []
    for step in sorted({0, steps - 1}):
        tensors = list(example_inputs(loaded, video, torch.float32, batch))
        tensors[3] = torch.tensor([step], dtype=torch.int32)
        feeds.append(OrderedDict((name, t.numpy()) for name, t in zip(INPUT_NAMES, tensors, strict=True)))
    return feeds


@dataclass(frozen=True)
class Tolerance:
    """An error past `atol` + `rtol` |reference| (or NaN) fails a verification."""

    atol: float = ATOL
    rtol: float = RTOL


def verify_graph(loaded: LoadedModel, artifacts: Artifacts, tolerance: Tolerance = Tolerance(),
                 save_dir: Path | None = None) -> Verification:
    """Compare the runners on the folder's graph, topology and budgets; an error past the tolerance (or NaN) is a
    failed verification (not raised)."""
    atol, rtol = tolerance.atol, tolerance.rtol
    topology, budgets, video, onnx_path = artifacts.topology, artifacts.budgets, artifacts.video, artifacts.folder.onnx
    metadata = OnnxMetadata.read(onnx_path)
    if metadata.dtype != "fp32":
        raise SaexportError(f"{onnx_path} is not an fp32 graph: ONNX Runtime runs fp32 exports (export it in fp32 "
                            "to verify it; a bf16 graph is verified through its engine)")
    module = build_sparse_dit(loaded, topology, budgets, video)
    feeds = verification_feeds(loaded, video, budgets.steps, metadata.batch)
    inputs = TensorMetadata()
    for name, value in feeds[0].items():
        inputs.add(name, value.dtype, value.shape)
    runners = [TorchDiTRunner(module, inputs), OnnxrtRunner(lambda: ort_session(onnx_path), name="onnxruntime")]
    paths = {}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        paths = {"save_inputs_path": str(save_dir / "inputs.json"), "save_outputs_path": str(save_dir / "outputs.json")}
    results = Comparator.run(runners, data_loader=feeds, **paths)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    reference = results[0][1]
    errors = {}
    for runner_name, iterations in list(results.items())[1:]:
        worst = 0.0
        for want, got in zip(reference, iterations, strict=True):
            a, b = want[OUTPUT_NAMES[0]], got[OUTPUT_NAMES[0]]
            worst = max(worst, float(np.linalg.norm(b - a) / np.linalg.norm(a))) if np.isfinite(b).all() else np.inf
        errors[runner_name] = worst
    return Verification(bool(accuracy), errors)
