"""Multi-rank runs on GPUs of one host (issue 23; run on a 2- or 4-GPU device machine: pytest -m gpu): Ulysses over
NCCL, each rank on its own GPU, against the single-GPU forward; through the fp32 reference op (as exact as the CPU
runs of tests/test_parallel.py) and through the CUDA kernel (bf16)."""

from __future__ import annotations

import pytest
import torch

from saexport import kernels
from saexport.topology.sensitivity import relative_error
from tests.test_parallel import run_ranks

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs of one host", allow_module_level=True)


def test_ulysses_on_nccl_equals_the_single_gpu_forward_fp32(tmp_path):
    results = run_ranks(tmp_path, 2, "--cuda")
    reference = results[0]["reference"]
    assert reference.abs().mean() > 0.1
    for result in results:
        assert torch.equal(result["reference"], reference)  # both GPUs built and ran the same model
        torch.testing.assert_close(result["output"], reference, rtol=0, atol=1e-5)


@pytest.mark.skipif(kernels.load_library() is None, reason="the kernel library is not built")
def test_ulysses_on_nccl_through_the_kernel_equals_the_single_gpu_forward_bf16(tmp_path):
    results = run_ranks(tmp_path, 2, "--cuda", "--kernel")
    step_order = results[0]["order"][1]  # [layers, heads] at the step the forward runs; rank 0 attends 0-3
    assert ((step_order[:, :4] < 4).sum(-1) == 2).all()  # two of the heavy heads 0-3 on each rank
    for result in results:
        assert torch.isfinite(result["output"]).all()
        assert relative_error(result["output"], result["reference"]) < 1e-2  # bf16: GEMMs of L/2 rows


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs of one host")
def test_cfg_parallel_on_two_ulysses_pairs_equals_the_single_gpu_sampling(tmp_path):
    results = run_ranks(tmp_path, 4, "--cuda", "--cfg")
    for result in results:
        torch.testing.assert_close(result["output"], results[0]["reference"], rtol=0, atol=1e-5)
