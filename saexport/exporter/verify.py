"""`export --verify`: the exported graph in ONNX Runtime against the PyTorch module it came from (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.exporter.onnx_export import build_sparse_dit, example_inputs
from saexport.models.checkpoint import LoadedModel
from saexport.models.video_shape import VideoShape
from saexport.runtime.ort_session import ort_session, run_dit

TOLERANCE = 1e-4  # relative error; fp32 on both sides lands near 1e-6


def verify_onnx(loaded: LoadedModel, topology: Topology, budgets: Budgets, video: VideoShape, onnx_path: Path,
                batch: int = 1, tolerance: float = TOLERANCE) -> dict[int, float]:
    """Relative error of ONNX Runtime against PyTorch at the first and last step (random inputs); an error past
    `tolerance`."""
    session = ort_session(onnx_path)
    module = build_sparse_dit(loaded, topology, budgets, video)
    errors = {}
    for step in sorted({0, budgets.steps - 1}):
        inputs = list(example_inputs(loaded, video, torch.float32, batch))
        inputs[3] = torch.tensor([step], dtype=torch.int32)
        got = run_dit(session, inputs)
        with torch.no_grad():
            want = module(*inputs)
        errors[step] = float((got - want).norm() / want.norm())
    worst = max(errors.values())
    if not worst <= tolerance:  # NaN fails too
        raise SaexportError(f"{onnx_path} disagrees with PyTorch: relative error {worst:.2e} > {tolerance:.0e} "
                            f"(per step: {', '.join(f'{s}: {e:.2e}' for s, e in errors.items())})")
    return errors
