"""The CUDA kernel against the float32 reference (run on the GPU machine: pytest -m gpu)."""

import math

import pytest
import torch

from saexport import kernels
from saexport.kernels import PackedMasks
from saexport.levels import pack_levels
from saexport.models.attention_op import block_sparse_attention, reference_block_sparse_attention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if kernels.load_library() is None:
    pytest.skip("the kernel library is not built (cmake -S . -B build && cmake --build build)",
                allow_module_level=True)

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def make_case(batch, seq_len, heads, head_dim, block_size, density, dtype, steps=3):
    """Random q/k/v and a topology whose budgets keep about `density` of the blocks at step 1."""
    n = math.ceil(seq_len / block_size)
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    levels = torch.randint(1, 255, (heads, n, n), dtype=torch.uint8)
    levels[:, torch.arange(n), torch.arange(n)] = 0
    budgets = torch.randint(0, 256, (steps, heads), dtype=torch.int32)
    budgets[1] = {0.0: 0, 1.0: 255}.get(density, round(density * 255))
    return q, k, v, pack_levels(levels).cuda(), budgets.cuda(), levels


def run_kernel(q, k, v, topology, budgets, step, block_size, scale):
    # Poisoned: the caching allocator hands the output the block of NaN just freed (checked by its address), so
    # every element must be written.
    step_index = torch.tensor([step], dtype=torch.int32, device="cuda")  # before: it must not take the block
    poison = torch.full_like(q, float("nan"))
    address = poison.data_ptr()
    del poison
    out = kernels.forward(q, k, v, PackedMasks(topology, budgets, block_size), step_index, scale)
    assert out.data_ptr() == address, "the output did not land on the poisoned block"
    torch.cuda.synchronize()
    return out


def reference(q, k, v, topology, budgets, step, block_size, scale):
    return reference_block_sparse_attention(q.float(), k.float(), v.float(), PackedMasks(topology, budgets, block_size),
                                            torch.tensor([step], dtype=torch.int32), scale)


def rel_err(got, want):
    assert torch.isfinite(got).all(), "unwritten or non-finite outputs"
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seq_len", [1024, 1000])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference(dtype, density, seq_len, head_dim):
    case = make_case(2, seq_len, 12, head_dim, 128, density, dtype)
    q, k, v, topology, budgets, _ = case
    scale = head_dim**-0.5
    got = run_kernel(q, k, v, topology, budgets, 1, 128, scale)
    assert rel_err(got, reference(q, k, v, topology, budgets, 1, 128, scale)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_40_heads_block_64_batch_1_with_tail(dtype):
    q, k, v, topology, budgets, _ = make_case(1, 1333, 40, 128, 64, 0.25, dtype)
    got = run_kernel(q, k, v, topology, budgets, 1, 64, 0.09)
    assert rel_err(got, reference(q, k, v, topology, budgets, 1, 64, 0.09)) < TOLERANCE[dtype]


def test_empty_rows_are_zeros_and_others_are_not():
    q, k, v, _, budgets, levels = make_case(1, 700, 4, 128, 128, 0.5, torch.bfloat16)
    levels[2, 3] = 255  # head 2, query block 3: nothing kept below the dense level
    budgets[1] = 200
    got = run_kernel(q, k, v, pack_levels(levels).cuda(), budgets, 1, 128, 0.1)
    assert torch.all(got[:, 384:512, 2] == 0)
    assert torch.all(got[:, 384:512, 1].abs().amax(-1) > 0)
    want = reference(q, k, v, pack_levels(levels).cuda(), budgets, 1, 128, 0.1)
    assert rel_err(got, want) < 1e-2


def test_step_index_is_read_on_device_and_clamped():
    q, k, v, topology, budgets, _ = make_case(1, 512, 4, 64, 128, 0.3, torch.float16, steps=4)
    last = reference(q, k, v, topology, budgets, 3, 128, 0.125)
    assert rel_err(run_kernel(q, k, v, topology, budgets, 99, 128, 0.125), last) < 5e-3
    first = reference(q, k, v, topology, budgets, 0, 128, 0.125)
    assert rel_err(run_kernel(q, k, v, topology, budgets, -5, 128, 0.125), first) < 5e-3


def test_cuda_graph_replay_follows_step_index():
    """12 x 32 query blocks: more than one per SM, so every replay relies on the tile counter being reset."""
    q, k, v, topology, budgets, _ = make_case(1, 4096, 12, 128, 128, 0.3, torch.bfloat16, steps=4)
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    masks = PackedMasks(topology, budgets, 128)
    kernels.forward(q, k, v, masks, step, 0.088)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = kernels.forward(q, k, v, masks, step, 0.088)  # the graph's own output buffer
    for s in (2, 0, 3):
        out.fill_(float("nan"))
        step.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(q, k, v, topology, budgets, s, 128, 0.088)) < 1e-2


def test_torch_op_dispatches_to_the_kernel_on_cuda():
    q, k, v, topology, budgets, _ = make_case(1, 900, 12, 128, 128, 0.5, torch.bfloat16)
    step = torch.tensor([1], dtype=torch.int32, device="cuda")
    got = block_sparse_attention(q, k, v, PackedMasks(topology, budgets, 128), step, 0.088)
    direct = run_kernel(q, k, v, topology, budgets, 1, 128, 0.088)
    assert torch.equal(got, direct)


def test_rows_of_very_different_lengths_in_one_launch():
    """Row u of every head keeps blocks 0..u only (a staircase): rows of 1 to n tiles in one launch."""
    q, k, v, _, budgets, levels = make_case(2, 1500, 12, 128, 128, 0.5, torch.bfloat16)
    n = levels.shape[-1]
    staircase = torch.where(torch.arange(n)[None, :] <= torch.arange(n)[:, None], 0, 255).to(torch.uint8)
    levels[:] = staircase
    budgets[1] = 100
    topology = pack_levels(levels).cuda()
    got = run_kernel(q, k, v, topology, budgets, 1, 128, 0.088)
    assert rel_err(got, reference(q, k, v, topology, budgets, 1, 128, 0.088)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_query_blocks_per_sm_with_empty_rows_between(dtype):
    """Each CTA of the persistent grid serves dozens of query blocks, empty ones among them, of uneven lengths
    and across heads and batch items; two launches in a row (the second must not inherit the first's counter)."""
    q, k, v, _, budgets, levels = make_case(2, 128 * 60 + 5, 16, 128, 128, 0.5, dtype)
    gen = torch.Generator().manual_seed(7)
    empty = torch.rand(levels.shape[:2], generator=gen) < 0.15  # [heads, n]
    levels[empty] = 255
    budgets[1] = torch.randint(20, 230, (16,), generator=gen).to(torch.int32)  # per-head densities
    topology = pack_levels(levels).cuda()
    want = reference(q, k, v, topology, budgets, 1, 128, 0.088)
    for _ in range(2):
        got = run_kernel(q, k, v, topology, budgets, 1, 128, 0.088)
        rows_empty = empty.repeat_interleave(128, dim=1)[:, :q.shape[1]].T  # [L, heads]
        assert torch.all(got[:, rows_empty] == 0)
        assert rel_err(got, want) < TOLERANCE[dtype]
