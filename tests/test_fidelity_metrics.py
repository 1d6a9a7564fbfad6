"""bench/fidelity_metrics.py (PSNR, SSIM, intervals, the caption check) and bench/fidelity.py's oracle hooks."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fidelity  # noqa: E402
import fidelity_metrics as fm  # noqa: E402

from saexport.demo import objects, videos  # noqa: E402
from saexport.levels import pack_levels  # noqa: E402


def test_psnr_and_ssim_of_known_pairs():
    a = torch.full((2, 3, 2, 16, 16), 0.5)
    b = torch.full((2, 3, 2, 16, 16), 0.6)
    assert torch.allclose(fm.psnr(a, b), torch.tensor([20.0, 20.0]), atol=1e-4)  # MSE 0.01
    # Flat images: only the luminance term is left, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = 0.01**2
    assert torch.allclose(fm.ssim(a, b), torch.full((2,), (0.6 + c1) / (0.61 + c1)), atol=1e-5)
    noise = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert float(fm.ssim(noise, noise)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(fm.ssim(noise, 1 - noise)[0]) < 0  # anti-correlated structure
    assert float(fm.psnr(noise, noise)[0]) > 100


def test_student_t_quantiles_and_intervals():
    for df, expected in ((1, 12.7062), (4, 2.7764), (9, 2.2622), (31, 2.0395), (1000, 1.9623)):
        assert fm.student_t_ppf(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert fm.student_t_ppf(0.025, 9) == pytest.approx(-2.2622, abs=1e-4)
    interval = fm.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (interval.mean, interval.n) == (3.0, 5)
    assert interval.half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)
    # Two seeds of one caption are one sample: the interval is over caption means.
    values = torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0, 7.0])
    clustered = fm.clustered_interval(values, [0, 0, 1, 1, 2, 2])
    assert clustered.n == 3 and clustered.mean == pytest.approx(11 / 3)
    assert clustered.half == pytest.approx(fm.t_interval([2.0, 3.0, 6.0]).half)
    assert math.isnan(fm.t_interval([1.0]).half)


@pytest.mark.parametrize("module, size", [(objects, 64), (objects, 128), (videos, 32)])
def test_caption_check_passes_ground_truth_and_fails_wrong_captions(module, size):
    scenes = module.scenes(6, seed=123, held_out=True)
    rendered = (module.render(scenes, 16, size, size, seed=4) + 1) / 2
    truths = [fm.truth_of(s) for s in scenes]
    right = fm.caption_scores(rendered, truths)
    wrong = fm.caption_scores(rendered, truths[3:] + truths[:3])
    assert float(right["colour"].nanmean()) >= 0.9 and float(right["motion"].nanmean()) >= 0.9
    assert float(right["all"].nanmean()) >= 0.85
    assert float(wrong["all"].nanmean()) < 0.6 and float(wrong["motion"].nanmean()) < 0.5
    # A video without its objects (the background alone) fails every object's colour.
    blank = torch.zeros_like(rendered[:1]) + torch.tensor([0.3, 0.3, 0.3]).view(1, 3, 1, 1, 1)
    assert float(fm.caption_scores(blank, truths[:1])["colour"][0]) == 0.0


def test_packing_on_device_matches_the_artifact_packing():
    levels = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fidelity.pack_levels_device(levels), pack_levels(levels))
    square = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    assert torch.equal(fidelity.pack_levels_device(square), pack_levels(square))


def test_oracle_mass_is_the_true_block_mass_and_keeps_the_goal():
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, heads, dim, block = 2, 32, 3, 8, 8
    q, k = (torch.randn(batch, seq_len, heads, dim, generator=gen) for _ in range(2))
    rows = torch.arange(seq_len)  # every row: the exact mass
    mass = fidelity.oracle_block_mass(q, k, rows, block, block, chunk=1)
    probs = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(dim), -1)
    exact = probs.unflatten(-1, (4, block)).sum(-1).unflatten(2, (4, block)).sum(3)
    assert torch.allclose(mass, exact, atol=1e-5)
    keep = fidelity.oracle_keep(mass, torch.tensor([0.5, 0.25, 1.0]))  # each head its own density
    assert keep.shape == mass.shape
    assert keep.flatten(-2).sum(-1).tolist() == [[8, 4, 16]] * batch  # the diagonal is the floor: 4 of 16
    assert keep.diagonal(dim1=-2, dim2=-1).all()
    # what is kept is the most massive off-diagonal pairs: no dropped pair outweighs a kept one
    off = mass.masked_fill(torch.eye(4, dtype=torch.bool), float("nan"))
    kept_min = torch.where(keep, off, float("inf")).nan_to_num(float("inf")).flatten(-2).amin(-1)
    dropped_max = torch.where(~keep, off, -1.0).nan_to_num(-1.0).flatten(-2).amax(-1)
    assert (kept_min[:, :2] >= dropped_max[:, :2]).all()


def test_radial_and_local_masks_and_warmup_split():
    from saexport.layout import parse_layout

    centres = fidelity.block_centres((16, 16, 16), parse_layout("tile3d:4x4x4"), 64)
    radial = fidelity.radial_scores(centres)
    # Same spatial distance, farther in time: ranked lower (the window halves as the frame distance doubles).
    same_place = [v for v in range(64) if torch.equal(centres[v, 1:], centres[0, 1:])]
    order = sorted(same_place[1:], key=lambda v: float(centres[v, 0]))
    assert all(radial[0, a] > radial[0, b] for a, b in zip(order, order[1:], strict=False))
    levels = fidelity.static_levels(radial.float(), 2, 2)
    assert (levels.diagonal(dim1=-2, dim2=-1) == 0).all()
    budgets = fidelity.uniform_budgets(levels, 4, 0.3)
    from saexport.levels import density

    assert float(density(levels, budgets).mean()) == pytest.approx(0.3, abs=0.01)
    assert fidelity.warm_split(20, 0.3, False) == (0, 0.3)
    warm, rest = fidelity.warm_split(20, 0.3, True)
    assert warm == 4 and (warm + 16 * rest) / 20 == pytest.approx(0.3)
    assert fidelity.warm_split(20, 0.2, True) is None  # the warm-up alone spends a 20% goal


def test_a_row_the_warm_up_spends_costs_no_budget(tmp_path):
    """Such a row only records "n/a", so a device call that has run out of budget still reports it as n/a rather
    than "not run"; a real row is estimated from the rows done (the oracle at 2.5 times)."""
    (tmp_path / "results").mkdir()
    bench = SimpleNamespace(steps=20, work=tmp_path, timings={"dense_s": 30.0})
    estimate = partial(fidelity.Bench.estimate, bench)
    assert estimate(fidelity.Row("FAST v2", 0.20, True, "bf16")) == 0.0
    assert estimate(fidelity.Row("FAST v2", 0.30, True, "bf16")) == 30.0
    assert estimate(fidelity.Row("oracle", 0.20, False, "bf16")) == 75.0


def test_spearman_ranks_with_ties():
    assert fm.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = torch.randn(20)
    assert fm.spearman(x, x.exp()) == pytest.approx(1.0)  # monotone: 1 whatever the shape
    assert fm.spearman(x, -x) == pytest.approx(-1.0)
    # against the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)) where there are no ties
    a, b = torch.randperm(12).double(), torch.randperm(12).double()
    d = fm.ranks(a) - fm.ranks(b)
    assert fm.spearman(a, b) == pytest.approx(1 - 6 * float(d.square().sum()) / (12 * (144 - 1)))
