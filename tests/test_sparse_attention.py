import math

import pytest
import torch

from saexport.kernels import PackedMasks
from saexport.levels import pack_levels
from saexport.models.attention_op import (
    block_sparse_attention,
    gathered_block_sparse_attention,
    reference_block_sparse_attention,
)
from tests.conftest import rel_err


def dense_masked_attention(q, k, v, keep, block_size, scale):
    """The whole L x L matrix in float64: the definition, for checking the chunked reference."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    blocks = torch.arange(q.shape[2]) // block_size
    token_keep = keep[:, blocks][:, :, blocks]  # [heads, L, L]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~token_keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def random_case(batch, seq_len, heads, dim, block_size, steps=3, dtype=torch.float32):
    n = math.ceil(seq_len / block_size)
    q, k, v = (torch.randn(batch, seq_len, heads, dim, dtype=dtype) for _ in range(3))
    levels = torch.randint(0, 256, (heads, n, n), dtype=torch.uint8)
    levels[:, torch.arange(n), torch.arange(n)] = 0  # structural diagonal: no row is empty by chance
    budgets = torch.randint(0, 256, (steps, heads), dtype=torch.int32)
    return q, k, v, levels, budgets


@pytest.mark.parametrize("seq_len,block_size", [(64, 16), (70, 16), (37, 8)])
def test_reference_equals_full_matrix_definition(seq_len, block_size):
    q, k, v, levels, budgets = random_case(2, seq_len, 3, 8, block_size)
    budgets[1] = torch.tensor([0, 128, 255])
    levels[0, 1] = 200  # head 0, query block 1: nothing kept at level 0 -> zeros
    step = torch.tensor([1], dtype=torch.int32)
    out = reference_block_sparse_attention(q, k, v, PackedMasks(pack_levels(levels), budgets, block_size), step, 0.3)
    keep = levels.int() <= budgets[1].view(-1, 1, 1)
    want = dense_masked_attention(q, k, v, keep, block_size, 0.3)
    assert rel_err(out, want) < 1e-6
    assert torch.all(out[:, block_size:2 * block_size, 0] == 0)  # the empty row
    assert out[:, block_size:2 * block_size, 1:].abs().min() > 0


def test_all_kept_equals_sdpa():
    q, k, v, levels, _ = random_case(1, 50, 2, 16, 16, dtype=torch.float64)
    budgets = torch.full((1, 2), 255, dtype=torch.int32)
    out = block_sparse_attention(q, k, v, PackedMasks(pack_levels(levels), budgets, 16),
                                 torch.tensor([0], dtype=torch.int32), 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.25)
    assert rel_err(out, want.transpose(1, 2)) < 1e-12


def test_low_precision_inputs_keep_dtype_and_accuracy():
    q, k, v, levels, budgets = random_case(1, 40, 2, 16, 8, dtype=torch.bfloat16)
    step = torch.tensor([2], dtype=torch.int32)
    out = reference_block_sparse_attention(q, k, v, PackedMasks(pack_levels(levels), budgets, 8), step, 0.25)
    assert out.dtype == torch.bfloat16
    keep = levels.int() <= budgets[2].view(-1, 1, 1)
    assert rel_err(out, dense_masked_attention(q, k, v, keep, 8, 0.25)) < 1e-2


def test_step_index_out_of_range_is_an_error():
    q, k, v, levels, budgets = random_case(1, 16, 1, 4, 8)
    with pytest.raises(ValueError, match="step_index 3 is outside"):
        reference_block_sparse_attention(q, k, v, PackedMasks(pack_levels(levels), budgets, 8),
                                         torch.tensor([3], dtype=torch.int32), 1.0)


def test_topology_of_wrong_grid_is_an_error():
    q, k, v, levels, budgets = random_case(1, 40, 2, 4, 8)
    with pytest.raises(ValueError, match="topology must be int32"):
        reference_block_sparse_attention(q, k, v, PackedMasks(pack_levels(levels[:, :4, :4]), budgets, 8),
                                         torch.tensor([0], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("seq_len,block_size,dtype", [(64, 16, torch.float32), (70, 16, torch.float32),
                                                      (37, 8, torch.bfloat16), (45, 8, torch.float64)])
def test_the_cpu_kernel_gathers_what_the_reference_masks(seq_len, block_size, dtype):
    """The op's CPU kernel (kept key blocks gathered per head, or masked above MASKED_ABOVE) against the reference:
    tails, an empty row on each path, uneven per-head budgets, a dense head."""
    q, k, v, levels, budgets = random_case(2, seq_len, 4, 8, block_size, dtype=dtype)
    budgets[1] = torch.tensor([0, 90, 200, 255])
    levels[0, 1] = 200  # head 0, query block 1: nothing kept at level 0 -> zeros
    levels[2, 0] = 255  # head 2 (~78% kept: computed masked), query block 0: nothing kept at 200 -> zeros
    masks, step = PackedMasks(pack_levels(levels), budgets, block_size), torch.tensor([1], dtype=torch.int32)
    got = gathered_block_sparse_attention(q, k, v, masks, step, 0.3)
    want = reference_block_sparse_attention(q, k, v, masks, step, 0.3)
    assert got.dtype == dtype and rel_err(got, want) < {torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    assert torch.all(got[:, block_size:2 * block_size, 0] == 0) and torch.all(got[:, :block_size, 2] == 0)
    assert torch.equal(block_sparse_attention(q, k, v, masks, step, 0.3), got)  # what the op runs on a CPU
