import math

import torch

from saexport.levels import density, kept_blocks, levels_from_scores, pack_levels, unpack_levels


def test_pack_layout_is_little_endian_bytes_with_255_padding():
    row = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    packed = pack_levels(row.expand(1, 5, 5).clone())  # one head, n = 5
    assert packed.shape == (1, 5, 2) and packed.dtype == torch.int32
    assert packed[0, 0, 0].item() == 1 | 2 << 8 | 3 << 16 | 4 << 24
    # word 1: level 5, then three padding bytes of 255 -> 0xFFFFFF05 as a signed int32
    assert packed[0, 0, 1].item() == 0xFFFFFF05 - 2**32


def test_pack_unpack_roundtrip_any_n():
    for n in (1, 3, 4, 7, 9):
        levels = torch.randint(0, 256, (3, n, n), dtype=torch.uint8)
        assert torch.equal(unpack_levels(pack_levels(levels)), levels.to(torch.int32))


def test_kept_blocks_and_density_agree_with_direct_count():
    levels = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    budgets = torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8)
    got = density(levels, budgets)
    for s in range(4):
        for layer in range(2):
            mask = kept_blocks(levels[layer], budgets[s, layer])
            assert torch.allclose(got[s, layer], mask.double().mean(dim=(-1, -2)))
    assert torch.all(density(levels, torch.full((1, 2, 3), 255, dtype=torch.uint8)) == 1.0)


def test_levels_from_scores_ranks_into_smallest_entering_density():
    # 2x2 map: scores 0.4 > 0.3 > 0.2 > 0.1 -> ranks 1..4 of 4 -> levels floor(255 (r - 1) / 4) + 1
    scores = torch.tensor([[0.4, 0.1], [0.2, 0.3]])
    assert levels_from_scores(scores).tolist() == [[1, 192], [128, 64]]


def test_level_p_keeps_the_top_ceil_p_n2_pairs():
    scores = torch.rand(7, 7)
    levels = levels_from_scores(scores)
    ranked = scores.flatten().argsort(descending=True)
    for level in (0, 1, 37, 128, 200, 255):
        top = ranked[: math.ceil(level / 255 * 49)]
        kept = (levels.flatten() <= level).nonzero().flatten()
        assert set(kept.tolist()) == set(top.tolist()), level


def test_equal_scores_share_the_best_level_of_their_tie_group():
    assert levels_from_scores(torch.full((2, 5, 5), 0.3)).eq(1).all()  # all equal: level 1 everywhere
    # 0.4 > 0.3 = 0.3 > 0.1: ranks 1, 2, 2, 4 -> levels 1, 64, 64, 192
    assert levels_from_scores(torch.tensor([[0.3, 0.1], [0.4, 0.3]])).tolist() == [[64, 192], [1, 64]]
    # with ties, level P keeps every pair scoring at least the ceil(P n^2 / 255)-th best score
    scores = torch.randint(0, 4, (6, 6)).float()  # many ties
    levels = levels_from_scores(scores)
    ranked = scores.flatten().sort(descending=True).values
    for level in (1, 37, 128, 200, 255):
        count = math.ceil(level / 255 * 36)
        kept = levels.flatten() <= level
        assert torch.equal(kept, scores.flatten() >= ranked[count - 1]), level
