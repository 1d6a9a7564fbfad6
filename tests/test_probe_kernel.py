"""The fused probe kernel (`saexport.models.probe_kernel`) against a float64 softmax: on a GPU (marked `gpu`) and on
the CPU under Triton's interpreter (run with `TRITON_INTERPRET=1`; skipped where Triton is missing, as in CI)."""

import importlib.util
import math
import os

import pytest
import torch

from saexport.models import processors
from saexport.models.processors import block_masses, block_masses_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton")
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRETED), reason="needs Triton and TRITON_INTERPRET=1")


def reference_masses(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 on the CPU: the full softmax of each sampled row, zero-padded to whole blocks, summed per block."""
    seq_len, dim = q.shape[1], q.shape[-1]
    q_rows = q[:, rows].transpose(1, 2).cpu().double()
    keys = k.transpose(1, 2).cpu().double()
    probs = torch.softmax(q_rows @ keys.transpose(-1, -2) / math.sqrt(dim), -1)
    n = -(-seq_len // block_size)
    return torch.nn.functional.pad(probs, (0, n * block_size - seq_len)).unflatten(-1, (n, block_size)).sum(-1)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every floating `torch.empty`/`empty_like` during the test comes filled with NaN: an output element (or an
    intermediate) the kernels never write shows up as NaN instead of as whatever the memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def check_kernel(device: str, dtype: torch.dtype, batch: int, seq_len: int, heads: int, dim: int, block_size: int,
                 num_rows: int) -> None:
    from saexport.models.probe_kernel import block_masses_triton

    # Logits of std 3: peaked rows, and blocks whose mass is tiny (an unwritten or misplaced one shows).
    q = (torch.randn(batch, seq_len, heads, dim) * 3).to(dtype)
    k = torch.randn(batch, seq_len, heads, dim).to(dtype)
    rows = torch.randperm(seq_len)[:num_rows]
    got = block_masses_triton(q.to(device), k.to(device), rows, block_size).cpu()
    want = reference_masses(q, k, rows, block_size)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g}"
    assert (got.double().sum(-1) - 1).abs().max().item() <= 1e-5


# Odd shapes: L not a multiple of the block (a short last block), R not a multiple of the 64-row tile.
SHAPES = [
    pytest.param(64, 64, id="block64-dim64"),
    pytest.param(64, 128, id="block64-dim128"),
    pytest.param(128, 64, id="block128-dim64"),
    pytest.param(128, 128, id="block128-dim128"),
    pytest.param(16, 16, id="block16-dim16"),
    pytest.param(256, 256, id="block256-dim256"),  # a block of several key tiles
]


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_size, dim", SHAPES)
def test_probe_kernel_on_the_gpu_matches_a_float64_softmax(poisoned_empty, dtype, block_size, dim):
    check_kernel("cuda", dtype, batch=2, seq_len=1000, heads=3, dim=dim, block_size=block_size, num_rows=150)


@pytest.mark.gpu
@needs_cuda_triton
def test_block_masses_on_the_gpu_takes_the_kernel_at_wan_scale():
    """Wan2.1-1.3B at 480p (L = 32760, 12 heads, head_dim 128, 4095 rows, blocks of 128): `block_masses` on CUDA
    is the kernel, and agrees with the torch path (exact bf16 products) on the same GPU."""
    from saexport.models.probe_kernel import block_masses_triton

    q = (torch.randn(1, 32760, 12, 128, device="cuda") * 3).bfloat16()
    k = torch.randn(1, 32760, 12, 128, device="cuda").bfloat16()
    rows = torch.arange(4095) * 8 + torch.randint(0, 8, (4095,))
    got = block_masses(q, k, rows, 128)
    assert torch.equal(got, block_masses_triton(q, k, rows, 128))
    err = (got - block_masses_torch(q, k, rows, 128)).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g}"


@needs_interpreter
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreted loops
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)  # not bf16: see below
@pytest.mark.parametrize("block_size, dim, seq_len", [(64, 64, 300), (16, 16, 90), (256, 32, 600)])
def test_probe_kernel_under_the_interpreter_matches_a_float64_softmax(poisoned_empty, dtype, block_size, dim,
                                                                      seq_len):
    """CPU tensors through Triton's interpreter. bf16 is left to the GPU test: the interpreter (3.5 to 3.9) keeps
    bf16 as uint16 and its `tl.dot` multiplies those bit patterns as integers."""
    check_kernel("cpu", dtype, batch=2, seq_len=seq_len, heads=3, dim=dim, block_size=block_size, num_rows=70)


def test_block_masses_on_the_cpu_never_reaches_for_triton(monkeypatch):
    def no_triton():
        raise AssertionError("the CPU path looked for the probe kernel")

    monkeypatch.setattr(processors, "_probe_kernel", no_triton)
    q, k = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    rows = torch.tensor([0, 17, 39])
    assert torch.allclose(block_masses(q, k, rows, 16), reference_masses(q, k, rows, 16).float(), atol=1e-6)


@pytest.mark.gpu
@needs_cuda_triton
def test_a_probe_kernel_that_does_not_build_falls_back_to_torch_once(monkeypatch):
    """Where Triton cannot build the kernel on this GPU, calibration warns once and probes with the torch path."""
    from triton.errors import TritonError

    from saexport.models import probe_kernel

    calls = []

    def fails_to_build(*args):
        calls.append(args)
        raise TritonError("out of shared memory")

    monkeypatch.setattr(probe_kernel, "block_masses_triton", fails_to_build)
    monkeypatch.setattr(processors, "_unbuildable", set())
    q, k = torch.randn(1, 300, 2, 64, device="cuda"), torch.randn(1, 300, 2, 64, device="cuda")
    rows = torch.tensor([0, 150, 299])
    with pytest.warns(UserWarning, match="fused probe does not build.*TritonError: out of shared memory"):
        got = block_masses(q, k, rows, 64)
    assert torch.allclose(got.cpu(), reference_masses(q, k, rows, 64).float(), atol=1e-5)
    block_masses(q, k, rows, 64)  # the failure is remembered: no second attempt
    assert len(calls) == 1
