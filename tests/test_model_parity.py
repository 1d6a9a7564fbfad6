import copy

import pytest
import torch

from saexport.artifacts import BlockedGrid
from saexport.layout import TokenLayout, parse_layout
from saexport.levels import DENSE_LEVEL
from saexport.models.dit import SparseWanDiT
from saexport.runtime.generation import model_identity
from saexport.topology.standin import standin_budgets, standin_topology
from tests.conftest import rel_err

GRID = (3, 4, 6)  # latent 3 x 8 x 12 with patch (1, 2, 2)


def make_sparse(loaded, layout: TokenLayout, block_size=8, dense=False):
    preset = loaded.preset
    topology = standin_topology(model_identity(loaded), preset.num_layers, preset.num_heads,
                                BlockedGrid(GRID, block_size, layout), seed=int(torch.randint(0, 1000, ())))
    budgets = standin_budgets(topology, steps=4, target_density=0.3)
    levels = torch.full_like(budgets.levels, DENSE_LEVEL) if dense else budgets.levels
    return SparseWanDiT(copy.deepcopy(loaded.transformer), GRID, layout, topology.levels, levels, block_size)


def inputs(loaded, step=1):
    return (torch.randn(1, 16, 3, 8, 12), torch.tensor([float(torch.randint(0, 1000, ()))]),
            torch.randn(1, loaded.preset.text_len, loaded.transformer.config.text_dim),
            torch.tensor([step], dtype=torch.int32))


@pytest.mark.parametrize("layout", ["identity", "tile3d:2x2x2"])
def test_dense_budgets_equal_unmodified_diffusers_model(tiny, layout):
    sparse = make_sparse(tiny, parse_layout(layout), dense=True)
    x, t, text, step = inputs(tiny)
    with torch.no_grad():
        want = tiny.transformer(x, t, text, return_dict=False)[0]
        got = sparse(x, t, text, step)
    assert rel_err(got, want) < 1e-5


def test_tile_layout_equals_raster_layout_when_dense(tiny):
    x, t, text, step = inputs(tiny)
    with torch.no_grad():
        raster = make_sparse(tiny, parse_layout("identity"), dense=True)(x, t, text, step)
        tiled = make_sparse(tiny, parse_layout("tile3d:1x2x3"), dense=True)(x, t, text, step)
    assert rel_err(tiled, raster) < 1e-5


def test_sparse_budgets_change_the_output_per_step(tiny):
    sparse = make_sparse(tiny, parse_layout("identity"))
    dense = make_sparse(tiny, parse_layout("identity"), dense=True)
    x, t, text, _ = inputs(tiny)
    with torch.no_grad():
        want = dense(x, t, text, torch.tensor([0], dtype=torch.int32))
        out0 = sparse(x, t, text, torch.tensor([0], dtype=torch.int32))
        out3 = sparse(x, t, text, torch.tensor([3], dtype=torch.int32))
    assert rel_err(out0, want) > 1e-3  # sparsity is really applied
    assert rel_err(out0, out3) > 1e-4  # and the step's budgets are really read


def test_tile_permutation_is_a_permutation_of_compact_tiles():
    perm = parse_layout("tile3d:2x2x2").permutation((4, 4, 4))
    assert sorted(perm.tolist()) == list(range(64))
    first_tile = perm[:8].view(-1)
    frames, rows, cols = first_tile // 16, first_tile // 4 % 4, first_tile % 4
    assert frames.max() <= 1 and rows.max() <= 1 and cols.max() <= 1
