"""`saexport verify` and `export --verify`: the exported graph against the PyTorch model it came from, on
polygraphy's runners and Comparator.

Runners, one after the other on the same inputs (random, seeded; the first and the last denoising step): the
PyTorch sparse DiT (the reference) and ONNX Runtime on the graph (the node served by the project's custom-op
library, `libsaexport_ort_ops.so`), both on one device in the graph's precision: an fp32 graph on the CPU (ONNX
Runtime through polygraphy's own runner), an fp16 or bf16 graph on the GPU (the CUDA execution provider; the torch
side runs the CUDA kernel library). Feeds and outputs are fp32 (polygraphy's numpy has no bf16); each runner casts
them. Inputs and outputs can be saved in polygraphy's JSON format. A TensorRT runner is not here: no machine of this
project runs TensorRT.
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
from polygraphy.comparator import Comparator, SimpleCompareFunc

from saexport.artifacts import OnnxMetadata
from saexport.errors import SaexportError
from saexport.exporter.onnx_export import INPUT_NAMES, OUTPUT_NAMES, build_sparse_dit, example_inputs
from saexport.models.checkpoint import LoadedModel, dtype_name
from saexport.models.video_shape import VideoShape
from saexport.runtime.denoisers import Denoiser, OnnxRuntimeDenoiser, TorchDenoiser
from saexport.runtime.generation import Artifacts
from saexport.runtime.ort_session import graph_device, ort_session

ATOL, RTOL = 1e-4, 1e-3  # fp32 on both sides lands near 1e-6 relative
# fp16 and bf16: two implementations round differently at every op, so an element-wise bound says little; the
# relative L2 error of the whole output is checked instead.
HALF_REL_L2 = {"fp16": 5e-3, "bf16": 3e-2}


class DenoiserRunner(BaseRunner):
    """polygraphy runner of a `Denoiser` (the torch sparse DiT, or the graph in ONNX Runtime on a GPU): fp32 numpy
    in and out, the back end's precision and device inside. (polygraphy's PytRunner assumes tuple outputs; its
    OnnxrtRunner feeds numpy, which has no bf16.)"""

    def __init__(self, denoiser: Denoiser, input_metadata: TensorMetadata, name: str):
        super().__init__(name=name, prefix="saexport-runner")
        self.denoiser, self.input_metadata = denoiser, input_metadata

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[name])) for name in INPUT_NAMES]
        start = time.perf_counter()
        out = self.denoiser.predict(*inputs)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAMES[0], out.float().cpu().numpy())])

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
    """For an fp32 graph, an element past `atol` + `rtol` |reference| fails a verification; for fp16 and bf16, a
    relative L2 error past `rel_l2` (None: HALF_REL_L2 of the graph's precision). NaN always fails."""

    atol: float = ATOL
    rtol: float = RTOL
    rel_l2: float | None = None


def verify_graph(loaded: LoadedModel, artifacts: Artifacts, tolerance: Tolerance = Tolerance(),
                 save_dir: Path | None = None, device: str | None = None) -> Verification:
    """Compare the runners on the folder's graph, topology and budgets, on `device` (see `graph_device`),
    `loaded` in the graph's precision; an error past the tolerance (or NaN) is a failed verification (not
    raised)."""
    topology, budgets, video, onnx_path = artifacts.topology, artifacts.budgets, artifacts.video, artifacts.folder.onnx
    metadata = OnnxMetadata.read(onnx_path)
    device = graph_device(metadata.dtype, device)
    if dtype_name(loaded.dtype) != metadata.dtype:
        raise SaexportError(f"{onnx_path} is a {metadata.dtype} graph: verify it against the model loaded in "
                            f"{metadata.dtype}, not {dtype_name(loaded.dtype)}")
    module = build_sparse_dit(loaded, topology, budgets, video).to(device)
    feeds = verification_feeds(loaded, video, budgets.steps, metadata.batch)
    inputs = TensorMetadata()
    for name, value in feeds[0].items():
        inputs.add(name, value.dtype, value.shape)
    reference = DenoiserRunner(TorchDenoiser(module, budgets.steps), inputs, name="torch")
    if metadata.dtype == "fp32":
        graph = OnnxrtRunner(lambda: ort_session(onnx_path, device=device), name="onnxruntime")
    else:
        graph = DenoiserRunner(OnnxRuntimeDenoiser(onnx_path, budgets.steps, device), inputs, name="onnxruntime")
    runners = [reference, graph]
    paths = {}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        paths = {"save_inputs_path": str(save_dir / "inputs.json"), "save_outputs_path": str(save_dir / "outputs.json")}
    results = Comparator.run(runners, data_loader=feeds, **paths)
    wanted = results[0][1]
    errors = {}
    for runner_name, iterations in list(results.items())[1:]:
        worst = 0.0
        for want, got in zip(wanted, iterations, strict=True):
            a, b = want[OUTPUT_NAMES[0]], got[OUTPUT_NAMES[0]]
            worst = max(worst, float(np.linalg.norm(b - a) / np.linalg.norm(a))) if np.isfinite(b).all() else np.inf
        errors[runner_name] = worst
    if metadata.dtype == "fp32":
        compare = SimpleCompareFunc(atol=tolerance.atol, rtol=tolerance.rtol)
        passed = bool(Comparator.compare_accuracy(results, compare_func=compare))
    else:
        limit = tolerance.rel_l2 if tolerance.rel_l2 is not None else HALF_REL_L2[metadata.dtype]
        passed = all(error <= limit for error in errors.values())
    return Verification(passed, errors)
