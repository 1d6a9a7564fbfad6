import math
from dataclasses import replace
from unittest import mock

import pytest
import torch

from saexport.artifacts import BlockedGrid, Budgets, Topology
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.levels import density
from saexport.models.processors import RowProbe, block_masses, block_partials
from saexport.models.text_encoder import synthetic_embeddings
from saexport.runtime.generation import model_identity
from saexport.runtime.sampler import sample
from saexport.topology.allocation import allocate, fit_budgets_v2, level_densities, levels_at
from saexport.topology.calibration import CalibrationLoop, Calibrator, HeadRows
from saexport.topology.fast import fit_budgets_v1
from saexport.topology.fast_v2 import compute_budgets_v2
from saexport.topology.goals import DENSITY_GOALS, BudgetRule, Goal, Warmup
from saexport.topology.prompts import CalibrationSet
from saexport.topology.quality import compute_quality, output_error_curves, quality_curves, residual_error_curves
from saexport.topology.quality_target import measure_psnr, meet_psnr
from saexport.topology.sensitivity import (
    SensitivityErrors,
    cell_errors,
    final_latents,
    final_latents_of_tables,
    latent_error_judge,
    relative_error,
    sensitivity_errors,
    step_buckets,
    uniform_levels,
)
from saexport.topology.standin import standin_topology
from tests.interrupts import Interrupt, interrupt_after


def linear_topology(layers: int, heads: int) -> Topology:
    """n = 16 blocks: each head's 256 pairs hold every level 0..255 once, so level P keeps (P + 1) / 256."""
    levels = torch.stack([torch.randperm(256).view(16, 16) for _ in range(layers * heads)]).view(layers, heads, 16, 16)
    return Topology(levels.to(torch.uint8), "m", "c", "w", (1, 1, 16), 1, parse_layout("identity"))


DENSITY = (torch.arange(256, dtype=torch.float64) + 1) / 256  # kept fraction at each level of linear_topology


def sharp(d: torch.Tensor) -> torch.Tensor:
    """A concentrated head: 0.8 of its quality in the first 5% of blocks, then a slow tail to 1."""
    return torch.where(d < 0.05, 0.8 * d / 0.05, 0.8 + 0.2 * (d - 0.05) / 0.95)


def flat(d: torch.Tensor) -> torch.Tensor:
    """A diffuse head: quality grows in proportion to the blocks kept."""
    return d.clone()


def objective(quality: torch.Tensor, levels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    chosen = quality.gather(-1, levels.long().unsqueeze(-1)).squeeze(-1)
    return float((chosen if weights is None else weights[:, :, None] * chosen).mean())


def test_level_densities_count_the_pairs_kept_at_each_level():
    topology = linear_topology(2, 3)
    assert torch.allclose(level_densities(topology.levels), DENSITY.expand(2, 3, 256))


HIGH, MEDIUM = Goal("high", density=0.45), Goal("medium", density=0.30)  # named like the density presets


def test_v2_takes_blocks_from_a_sharp_heads_tail_that_v1_equalises_into():
    # One layer, a sharp and a flat head, equal weights, goal 45%. v1 equalises their fidelity: the flat head
    # needs ~81% of its blocks to reach the target, so the sharp head is pushed ~4% into its slow tail (slope
    # 0.21 per unit of density) while each block of the flat head buys 1. v2 stops the sharp head where its
    # quality stops paying (5%) and gives the rest to the flat head: fewer blocks for the sharp head, more
    # objective at the same density.
    topology = linear_topology(1, 2)
    quality = torch.stack([sharp(DENSITY), flat(DENSITY)]).expand(3, 1, 2, 256).contiguous()  # 3 steps
    v1 = fit_budgets_v1(topology, quality, HIGH)
    v2 = fit_budgets_v2(topology, quality, HIGH, "synthetic")
    d1, d2 = density(topology.levels, v1.levels), density(topology.levels, v2.levels)
    assert abs(v1.mean_density - 0.45) <= 0.01 and abs(v2.mean_density - 0.45) <= 0.01
    assert float(d2[..., 0].mean()) == pytest.approx(0.05, abs=0.005)  # sharp head: its steep part only
    assert float(d1[..., 0].mean()) > float(d2[..., 0].mean()) + 0.03  # v1 gives it ~9%
    assert objective(quality, v2.levels) > objective(quality, v1.levels) + 0.015
    # and v2 beats one uniform density (uniform WEST) on the objective too
    uniform = torch.full_like(v2.levels, 114)  # (114 + 1) / 256 = 0.449
    assert objective(quality, v2.levels) > objective(quality, uniform) + 0.1


@pytest.mark.parametrize("preset", list(DENSITY_GOALS))
def test_v2_meets_every_goal_and_records_how(preset):
    topology = linear_topology(2, 4)
    # concave curves of random sharpness per (step, layer, head): 1 - (1 - d)^k
    sharpness = torch.rand(5, 2, 4, 1, dtype=torch.float64) * 30 + 1
    quality = 1 - (1 - DENSITY) ** sharpness
    weights = torch.rand(5, 2, dtype=torch.float64) + 0.5
    budgets = fit_budgets_v2(topology, quality, Goal(preset, density=DENSITY_GOALS[preset]), "output", weights)
    goal = DENSITY_GOALS[preset]
    achieved = float(density(topology.levels, budgets.levels).mean())
    assert goal - 0.01 <= achieved <= goal + 1e-9  # meets the goal from below, within 1 pp
    assert budgets.mean_density == pytest.approx(achieved)
    curve = budgets.curve
    assert curve["rule"] == "v2" and curve["proxy"] == "output" and curve["density_goal"] == goal
    assert curve["warmup_steps"] == 0 and curve["lambda"] > 0
    assert curve["achieved_density"] == pytest.approx(achieved)
    assert curve["objective"] == pytest.approx(objective(quality, budgets.levels, weights))
    assert torch.allclose(torch.tensor(curve["weights"], dtype=torch.float64), weights, rtol=1e-4)
    assert budgets.fidelity == preset and budgets.topology_hash == topology.hash()
    # v1 records its rule too
    assert fit_budgets_v1(topology, quality, Goal(preset, density=DENSITY_GOALS[preset])).curve["rule"] == "v1"


def test_lambda_is_monotonic_and_the_weights_steer_blocks():
    topology = linear_topology(1, 3)
    sharpness = torch.tensor([5.0, 10.0, 20.0], dtype=torch.float64).view(1, 1, 3, 1)
    quality = (1 - (1 - DENSITY) ** sharpness).expand(4, 1, 3, 256).contiguous()
    weights = torch.tensor([[4.0], [2.0], [1.0], [0.5]], dtype=torch.float64)
    value = weights[:, :, None, None] * quality
    densities = level_densities(topology.levels)
    means = [float(densities.expand(4, -1, -1, -1).gather(-1, levels_at(value, densities, lam).unsqueeze(-1)).mean())
             for lam in (0.0, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 100.0)]
    assert all(a >= b for a, b in zip(means, means[1:], strict=False)) and means[0] > 0.5 > 0.05 > means[-1]
    lams = [allocate(quality, weights, densities, goal).lam for goal in (0.45, 0.30, 0.20)]
    assert lams[0] < lams[1] < lams[2]  # a tighter goal is a higher price per block
    # identical curves, decreasing weights: the steps weighted more get more blocks
    per_step = density(topology.levels, allocate(quality, weights, densities, 0.30).levels).mean(dim=(1, 2))
    assert all(a > b for a, b in zip(per_step, per_step[1:], strict=False))


def test_warmup_steps_are_dense_and_counted_inside_the_goal():
    topology = linear_topology(2, 2)
    quality = (1 - (1 - DENSITY) ** 8).expand(10, 2, 2, 256).contiguous()
    budgets = fit_budgets_v2(topology, quality, MEDIUM, "hellinger", warmup=Warmup(2))
    per_step = density(topology.levels, budgets.levels).mean(dim=(1, 2))
    assert (budgets.levels[:2] == 255).all() and torch.all(per_step[:2] == 1.0)
    assert budgets.mean_density == pytest.approx(0.30, abs=0.01) and budgets.mean_density <= 0.30 + 1e-9
    assert float(per_step[2:].mean()) == pytest.approx((0.30 * 10 - 2) / 8, abs=0.0125)  # what is left: 12.5%
    assert budgets.curve["warmup_steps"] == 2
    with pytest.raises(SaexportError, match="warm-up steps leave"):
        fit_budgets_v2(topology, quality, MEDIUM, "hellinger", warmup=Warmup(3))  # 3 of 10 dense already exceed 30%


def test_auto_warmup_keeps_the_count_its_judge_prefers():
    topology = linear_topology(1, 2)
    quality = (1 - (1 - DENSITY) ** 8).expand(9, 1, 2, 256).contiguous()
    seen = []

    def judge(budgets: Budgets) -> float:  # as an end-to-end error would: here it favours 2 dense steps
        count = int((budgets.levels == 255).all(dim=(1, 2)).sum())
        seen.append(count)
        return -abs(count - 2)

    budgets = fit_budgets_v2(topology, quality, HIGH, "hellinger", warmup=Warmup("auto", judge=judge))
    assert seen == [0, 1, 2, 3] and budgets.curve["warmup_steps"] == 2 and budgets.curve["warmup"] == "auto"
    assert [c[0] for c in budgets.curve["warmup_candidates"]] == [0, 1, 2, 3]
    assert abs(budgets.mean_density - 0.45) <= 0.01
    # Without a judge, the proxy objective decides; forcing steps dense only constrains it, so no warm-up wins.
    plain = fit_budgets_v2(topology, quality, HIGH, "hellinger", warmup=Warmup("auto"))
    objectives = [c[1] for c in plain.curve["warmup_candidates"]]
    assert plain.curve["warmup_steps"] == objectives.index(max(objectives)) == 0


def test_bad_inputs_are_refused():
    topology = linear_topology(1, 2)
    quality = torch.rand(2, 1, 2, 256, dtype=torch.float64)
    with pytest.raises(TypeError):  # the proxy is named by the caller, never defaulted into the file
        fit_budgets_v2(topology, quality, HIGH)
    with pytest.raises(SaexportError, match="layers x heads"):
        fit_budgets_v2(topology, torch.rand(2, 1, 3, 256), HIGH, "hellinger")
    with pytest.raises(SaexportError, match="`warmup` must be a number of steps or 'auto', got 'some'"):
        Warmup("some")
    with pytest.raises(SaexportError, match="`warmup` must be within 0..2 steps, got 7"):
        fit_budgets_v2(topology, quality, HIGH, "hellinger", warmup=Warmup(7))
    with pytest.raises(SaexportError, match="non-negative"):
        fit_budgets_v2(topology, quality, HIGH, "hellinger", -torch.ones(2, 1))
    with pytest.raises(SaexportError, match="non-finite"):
        fit_budgets_v2(topology, quality * float("nan"), HIGH, "hellinger")


# --- quality proxies (topology.quality) and their probe (models.processors.block_partials) ---------------------


def brute_force_outputs(q, k, v, rows, row_levels_h, block_size, level):
    """Masked softmax attention of `rows` of one head (float64): keys whose block pair level <= `level`."""
    seq_len = q.shape[0]
    key_block = torch.arange(seq_len) // block_size
    logits = q[rows].double() @ k.double().T / math.sqrt(q.shape[-1])  # [R, L]
    keep = row_levels_h[:, key_block] <= level  # [R, L]
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)  # all-masked rows: zeros
    return probs @ v.double()


def test_block_partials_sum_p_v_per_key_block():
    q, k, v = (torch.randn(2, 37, 3, 8) for _ in range(3))
    rows = torch.tensor([[0, 5, 36], [1, 2, 30], [36, 17, 9]])  # per head
    masses, partials = block_partials(q, k, v, rows, block_size=16, chunk=2)
    assert masses.shape == (2, 3, 3, 3) and partials.shape == (2, 3, 3, 3, 8)
    for b in range(2):
        for h in range(3):
            probs = torch.softmax(q[b, rows[h], h] @ k[b, :, h].T / math.sqrt(8), -1)  # [R, L]
            for block, keys in enumerate((slice(0, 16), slice(16, 32), slice(32, 37))):
                assert torch.allclose(masses[b, h, :, block], probs[:, keys].sum(-1), atol=1e-6)
                assert torch.allclose(partials[b, h, :, block], probs[:, keys] @ v[b, keys, h], atol=1e-6)
    assert torch.allclose(block_masses(q, k, rows[0], 16)[:, 0], masses[:, 0], atol=1e-6)  # the old probe agrees


def random_levels(heads: int, n: int) -> torch.Tensor:
    levels = torch.randint(1, 256, (heads, n, n), dtype=torch.uint8)
    levels[:, torch.arange(n), torch.arange(n)] = 0
    return levels


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_output_proxy_is_the_relative_error_of_masked_attention(dtype, tolerance):
    seq_len, heads, dim, block_size = 45, 2, 6, 8  # n = 6, last block partial
    q, k, v = (torch.randn(1, seq_len, heads, dim, dtype=dtype) * 1.5 for _ in range(3))
    levels = random_levels(heads, 6)
    rows = HeadRows.draw(seq_len, heads, block_size, rows_per_head=7, seed=int(torch.randint(0, 999, ())))
    row_levels = levels[torch.arange(heads).view(-1, 1), rows.block]  # [H, R, n]
    masses, partials = block_partials(q, k, v, rows.rows, block_size)
    probe = RowProbe(masses, partials, torch.eye(heads * dim))
    curves = output_error_curves(probe, row_levels)
    assert curves.shape == (heads, 256)
    for h in range(heads):
        dense = brute_force_outputs(q[0, :, h], k[0, :, h], v[0, :, h], rows.rows[h], row_levels[h], block_size, 255)
        for level in sorted({0, 1, 128, 254, 255, *levels[h].flatten().tolist()}):
            sparse = brute_force_outputs(q[0, :, h], k[0, :, h], v[0, :, h], rows.rows[h], row_levels[h],
                                         block_size, level)
            want = float((sparse - dense).norm() / dense.norm())
            assert curves[h, level].item() == pytest.approx(want, abs=tolerance), (h, level)
    assert torch.all(curves[:, 255] < tolerance)


def test_output_proxy_of_a_row_with_nothing_kept_is_a_full_error():
    q, k, v = (torch.randn(1, 16, 1, 4, dtype=torch.float64) for _ in range(3))
    levels = torch.full((1, 2, 2), 9, dtype=torch.uint8)  # nothing below level 9, not even the diagonal
    rows = torch.tensor([[3, 12]])
    probe = RowProbe(*block_partials(q, k, v, rows, 8), torch.eye(4))
    curves = output_error_curves(probe, levels[:, rows[0] // 8])
    assert curves[0, :9].tolist() == pytest.approx([1.0] * 9) and curves[0, 9:].abs().max() < 1e-12
    q_of = quality_curves(("output", "hellinger"), probe, levels[:, rows[0] // 8])
    assert q_of["output"][0, 0].item() == pytest.approx(0.0) and q_of["hellinger"][0, 0].item() == 0.0


def test_residual_proxy_is_the_gated_projected_change_relative_to_the_stream():
    batch, seq_len, heads, dim, block_size, model_dim = 2, 30, 3, 4, 8, 10
    q, k, v = (torch.randn(batch, seq_len, heads, dim, dtype=torch.float64) for _ in range(3))
    levels = random_levels(heads, 4)
    rows = HeadRows.draw(seq_len, heads, block_size, rows_per_head=5, seed=3)
    row_levels = levels[torch.arange(heads).view(-1, 1), rows.block]
    weight = torch.randn(model_dim, heads * dim, dtype=torch.float64)
    stream = torch.randn(batch, heads, 5, model_dim, dtype=torch.float64)
    gate = torch.randn(batch, model_dim, dtype=torch.float64)
    probe = RowProbe(*block_partials(q, k, v, rows.rows, block_size), weight, stream, gate)
    curves = residual_error_curves(probe, row_levels)
    for h in range(heads):
        w_h = weight[:, h * dim:(h + 1) * dim]
        for level in (0, 77, 160, 255):
            ratios = []
            for b in range(batch):
                args = (k[b, :, h], v[b, :, h], rows.rows[h], row_levels[h], block_size)
                delta = (brute_force_outputs(q[b, :, h], *args, level) - brute_force_outputs(q[b, :, h], *args, 255))
                change = (delta @ w_h.T) * gate[b]  # [R, model dim]: the residual update's change
                ratios.append(float(change.norm() / stream[b, h].norm()))
            assert curves[h, level].item() == pytest.approx(sum(ratios) / batch, abs=1e-9)
    with pytest.raises(SaexportError, match="residual stream"):
        residual_error_curves(RowProbe(probe.masses, probe.partials, weight), row_levels)


def test_head_rows_are_distinct_seeded_and_per_head():
    rows = HeadRows.draw(100, 4, 16, rows_per_head=16, seed=5)
    assert rows.rows.shape == (4, 16) and torch.equal(rows.block, rows.rows // 16)
    assert all(len(set(r.tolist())) == 16 for r in rows.rows) and int(rows.rows.max()) < 100
    assert not torch.equal(rows.rows[0], rows.rows[1])
    assert torch.equal(HeadRows.draw(100, 4, 16, 16, seed=5).rows, rows.rows)
    assert HeadRows.draw(10, 2, 4, rows_per_head=16, seed=0).rows.shape == (2, 10)  # capped at the sequence


LOOP = CalibrationLoop(seeds=(0,), steps=3, flow_shift=3.0)


def quiet(items, **_):
    return items


def calibrator(loaded, prompts, loop=LOOP, **settings) -> Calibrator:
    return Calibrator(loaded, prompts, loop, progress=settings.pop("progress", quiet), **settings)


@pytest.fixture
def tiny_setup(tiny):
    embeddings = synthetic_embeddings(tiny.preset.text_len, 32, prompts=3, seed=int(torch.randint(0, 99, ())))
    prompts = CalibrationSet(embeddings[:2], embeddings[2:], "test")
    layers, heads = tiny.preset.num_layers, tiny.preset.num_heads
    blocks = BlockedGrid((3, 4, 4), 8, parse_layout("tile3d:1x2x4"))
    topology = standin_topology(model_identity(tiny), layers, heads, blocks)
    return tiny, prompts, topology


def test_quality_along_the_loop_on_the_tiny_model(tiny_setup, tmp_path):
    tiny, prompts, topology = tiny_setup
    quality = compute_quality(calibrator(tiny, prompts), topology, rows_per_head=4)
    assert set(quality) == {"hellinger", "output", "residual"}
    for proxy, table in quality.items():
        assert table.shape == (3, 2, 4, 256) and torch.isfinite(table).all(), proxy
        assert torch.allclose(table[..., 255], torch.ones(()).double(), atol=1e-5), proxy  # dense is exact
        assert float(table[..., 0].mean()) < 0.999, proxy  # the diagonal alone loses something
    assert torch.all(quality["hellinger"][..., 1:] >= quality["hellinger"][..., :-1] - 1e-12)
    # the probe's hooks are gone from the shared transformer: a later dense model sees no probe
    assert all(not block._forward_pre_hooks for block in tiny.transformer.blocks)
    # the v2 allocation takes the table as is
    budgets = fit_budgets_v2(topology, quality["output"], MEDIUM, "output")
    assert abs(budgets.mean_density - 0.30) <= 0.01

    partial = tmp_path / "quality.partial"
    with pytest.raises(Interrupt):  # after the first trajectory's 6 passes
        compute_quality(calibrator(tiny, prompts, progress=interrupt_after(8), progress_file=partial), topology,
                        ("output",), 4)
    assert partial.exists() and all(not block._forward_pre_hooks for block in tiny.transformer.blocks)
    resumed = compute_quality(calibrator(tiny, prompts, progress_file=partial), topology, ("output",), 4)
    assert torch.allclose(resumed["output"], quality["output"], atol=1e-6) and not partial.exists()


# --- sensitivity weights (topology.sensitivity) ------------------------------------------------------------------


def test_step_buckets_cover_the_steps_in_order():
    assert step_buckets(10, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert step_buckets(7, 3) == [(0, 2), (2, 5), (5, 7)] and step_buckets(2, 5) == [(0, 1), (1, 2)]


def test_sensitivity_on_the_tiny_model(tiny_setup):
    tiny, prompts, topology = tiny_setup  # (each generation runs the reference op on the CPU: ~1 s for 2 steps)
    loop = CalibrationLoop(seeds=(0,), steps=2, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    errors = sensitivity_errors(calibrator(tiny, one, loop), topology, density=0.3, buckets=2)
    assert errors.buckets == [(0, 1), (1, 2)] and errors.groups == [(0, 1), (1, 2)]
    assert all(e > 1e-4 for e in errors.bucket_errors + errors.group_errors)  # sparsity moves the final latents
    w = errors.weights()
    assert w.shape == (2, 2) and torch.all(w > 0) and float(w.mean()) == pytest.approx(1.0)
    a, b = (torch.tensor(e, dtype=torch.float64) for e in (errors.bucket_errors, errors.group_errors))
    assert torch.allclose(w, (a[:, None] * b[None, :]) / (a.mean() * b.mean()))  # the product model, mean 1
    # the uniform reference keeps ~30% of every head's pairs
    assert density(topology.levels, uniform_levels(topology, 0.3)[None]).sub(0.3).abs().max() < 1 / 36
    # the measurement is of sparsity alone: at density 1 nothing changes
    dense = sensitivity_errors(calibrator(tiny, one, loop), topology, density=1.0, buckets=1, layer_groups=1)
    assert dense.groups == [(0, 2)] and max(dense.bucket_errors + dense.group_errors) == 0.0
    with pytest.raises(SaexportError, match="no sensitivity"):
        dense.weights()
    # the end-to-end judge chooses the warm-up: its scores are minus the final error, recorded per candidate
    three = replace(loop, steps=3)  # one dense step of 3 leaves the others 17.5% of blocks at 45%: feasible
    judge = latent_error_judge(calibrator(tiny, one, three), topology)
    quality = 1 - (1 - level_densities(topology.levels)).unsqueeze(0).expand(3, -1, -1, -1) ** 4
    budgets = fit_budgets_v2(topology, quality, HIGH, "hellinger", warmup=Warmup("auto", 1, judge))
    scores = [c[3] for c in budgets.curve["warmup_candidates"]]
    assert len(scores) == 2 and scores[0] < 0 and scores[1] <= 0
    assert budgets.curve["warmup_steps"] == scores.index(max(scores))


def test_cell_errors_sparsify_one_step_bucket_of_one_layer(tiny_setup):
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0,), steps=2, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    cells = cell_errors(calibrator(tiny, one, loop), topology, density=0.3, buckets=2)
    assert cells.shape == (2, 2) and bool((cells > 1e-4).all())
    # a cell is its own generation: the last step of layer 1 alone, by hand
    levels = torch.full((2, *topology.levels.shape[:2]), 255, dtype=torch.uint8)
    levels[1, 1] = uniform_levels(topology, 0.3)[1]
    by_hand = relative_error(final_latents(calibrator(tiny, one, loop), topology, levels),
                             final_latents(calibrator(tiny, one, loop), topology, None))
    assert float(cells[1, 1]) == pytest.approx(by_hand, rel=1e-9)


def test_sensitivity_of_a_shorter_loop_weighs_the_same_fractions_of_generations_loop():
    errors = SensitivityErrors(steps=2, buckets=[(0, 1), (1, 2)], bucket_errors=[1.0, 3.0], groups=[(0, 1), (1, 3)],
                               group_errors=[2.0, 1.0], density=0.3)
    a = torch.tensor([1.0, 1, 3, 3, 3], dtype=torch.float64)  # 5 steps: the first bucket 2 of them, the second 3
    b = torch.tensor([2.0, 1, 1], dtype=torch.float64)
    want = a[:, None] * b[None, :]
    assert torch.allclose(errors.weights(5), want / want.mean())
    assert torch.allclose(errors.weights(), errors.weights(2)) and errors.weights().shape == (2, 3)
    with pytest.raises(SaexportError, match="2 sensitivity buckets cannot weigh a loop of 1 steps"):
        errors.weights(1)


def test_budgets_v2_end_to_end_on_the_tiny_model(tiny_setup):
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0,), steps=3, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    budgets = compute_budgets_v2(calibrator(tiny, one, loop), topology, HIGH,
                                 BudgetRule(proxy="output", rows_per_head=4, buckets=3))
    curve = budgets.curve
    assert budgets.levels.shape == (3, 2, 4) and abs(budgets.mean_density - 0.45) <= 0.01
    assert curve["rule"] == "v2" and curve["proxy"] == "output" and curve["rows_per_head"] == 4
    assert curve["sensitivity"]["density"] == 0.45 and curve["sensitivity"]["steps"] == 2  # half of 3, rounded up
    assert len(curve["sensitivity"]["bucket_errors"]) == 2  # 3 buckets asked, 2 steps to hold them
    weights = torch.tensor(curve["weights"])
    assert weights.shape == (3, 2) and torch.all(weights > 0) and float(weights.mean()) == pytest.approx(1, abs=1e-4)
    with pytest.raises(SaexportError, match="`warmup` must be within 0..3 steps, got 7"):
        compute_budgets_v2(calibrator(tiny, one, loop), topology, HIGH, BudgetRule(warmup=7, sensitivity=False))
    # measured on a loop of 2 steps (which holds 2 of the 3 buckets) with the 2 layers as one group: 1 + 2 + 1
    # generations of 2 steps, not 1 + 3 + 2 of 3; the weights still cover generation's 3 steps (per layer equal)
    with mock.patch("saexport.topology.sensitivity.sample", wraps=sample) as generations:
        cheap = compute_budgets_v2(calibrator(tiny, one, loop), topology, HIGH,
                                   BudgetRule(proxy="output", rows_per_head=4, buckets=3, sensitivity_steps=2,
                                              layer_groups=1))
    assert generations.call_count == 4 and all(c.args[1].steps == 2 for c in generations.call_args_list)
    assert cheap.curve["sensitivity"]["steps"] == 2 and cheap.curve["sensitivity"]["layer_groups"] == [[0, 2]]
    cheap_weights = torch.tensor(cheap.curve["weights"])
    assert cheap_weights.shape == (3, 2) and torch.equal(cheap_weights[:, 0], cheap_weights[:, 1])
    assert abs(cheap.mean_density - 0.45) <= 0.01


def test_an_interrupted_sensitivity_resumes_from_its_last_generation(tiny_setup, tmp_path):
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0,), steps=2, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    whole = sensitivity_errors(calibrator(tiny, one, loop), topology, 0.3, 2)
    partial = tmp_path / "budgets.partial"
    with pytest.raises(Interrupt):  # dense + 2 parts done
        sensitivity_errors(calibrator(tiny, one, loop, progress=interrupt_after(3), progress_file=partial), topology,
                           0.3, 2)
    partial = tmp_path / "budgets.partial.sensitivity"
    assert partial.is_file()
    with mock.patch("saexport.topology.sensitivity.final_latents_of_tables", wraps=final_latents_of_tables) as generate:
        resumed = sensitivity_errors(calibrator(tiny, one, loop, progress_file=tmp_path / "budgets.partial"),
                                     topology, 0.3, 2)
    assert generate.call_count == 2  # the 2 parts left; not the dense run nor the finished parts
    assert resumed == whole and not partial.exists()


def test_budget_tables_batched_in_one_loop_give_each_tables_own_latents(tiny_setup):
    """Samples of one batch carry their own budgets (the batch folded into the heads): the same final latents as
    each table's own generation, and so the same sensitivity at any batch size."""
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0, 3), steps=2, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    sparse = torch.randint(0, 256, (2, *topology.levels.shape[:2]), dtype=torch.uint8)
    alone = [final_latents(calibrator(tiny, one, loop), topology, table) for table in (None, sparse)]
    together = final_latents_of_tables(calibrator(tiny, one, loop, batch_size=4), topology, [None, sparse])
    for own, batched in zip(alone, together, strict=True):
        assert own.shape == (2, 16, 3, 8, 8) and rel_err_of(batched, own) < 1e-5
    assert rel_err_of(together[1], together[0]) > 1e-3  # the tables differ, and so do their latents
    batched = sensitivity_errors(calibrator(tiny, one, loop, batch_size=5), topology, 0.3, 2)
    single = sensitivity_errors(calibrator(tiny, one, loop), topology, 0.3, 2)
    assert batched.bucket_errors + batched.group_errors == pytest.approx(single.bucket_errors + single.group_errors,
                                                                          rel=1e-3)


def rel_err_of(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_an_interrupted_v2_build_keeps_its_measured_proxy(tiny_setup, tmp_path):
    """Interrupted during the sensitivity's generations, FAST v2 resumes without measuring the proxy again and
    writes the uninterrupted run's budgets; nothing is left beside the output."""
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0,), steps=2, flow_shift=3.0)
    one = CalibrationSet(prompts.embeddings[:1], prompts.negative, "test")
    rule = BudgetRule(rows_per_head=4, buckets=2)
    whole = compute_budgets_v2(calibrator(tiny, one, loop), topology, MEDIUM, rule)
    partial = tmp_path / "budgets.safetensors.partial"
    with pytest.raises(Interrupt):
        compute_budgets_v2(calibrator(tiny, one, loop, progress=interrupt_after(2, "FAST sensitivity"),
                                      progress_file=partial), topology, MEDIUM, rule)
    with mock.patch("saexport.topology.fast_v2.compute_quality") as measure:
        resumed = compute_budgets_v2(calibrator(tiny, one, loop, progress_file=partial), topology, MEDIUM, rule)
    assert measure.call_count == 0
    assert torch.equal(resumed.levels, whole.levels) and resumed.curve == whole.curve
    assert list(tmp_path.iterdir()) == []


# --- quality targets (topology.quality_target) -------------------------------------------------------------------


def test_a_psnr_target_gets_the_least_density_that_meets_it_on_held_out_prompts(tiny_setup):
    tiny, prompts, topology = tiny_setup
    loop = CalibrationLoop(seeds=(0,), steps=2, flow_shift=3.0)
    held_out = CalibrationSet(prompts.embeddings[1:2], prompts.negative, "held out")
    one = calibrator(tiny, CalibrationSet(prompts.embeddings[:1], prompts.negative, "test"), loop, held_out=held_out,
                     batch_size=8)
    quality = 1 - (1 - level_densities(topology.levels)).unsqueeze(0).expand(2, -1, -1, -1) ** 4
    made = []

    def budgets_at(density: float) -> Budgets:
        made.append(density)
        return fit_budgets_v2(topology, quality, Goal.of_density(density), "hellinger")

    checker = one.checker()
    assert checker.loop.seeds == (1000,) and torch.equal(checker.prompts.embeddings, held_out.embeddings)
    # the curve first, then a target between two of its points
    curve, dense = measure_psnr(checker, topology, [budgets_at(d) for d in (0.2, 0.5, 0.9)])
    again, _ = measure_psnr(checker, topology, [budgets_at(0.5)], dense)  # the dense videos reused
    assert again[0]["psnr"] == pytest.approx(curve[1]["psnr"], abs=1e-3)
    assert [row["psnr"] for row in curve] == sorted(row["psnr"] for row in curve)  # more blocks, closer to dense
    target = (curve[0]["psnr"] + curve[1]["psnr"]) / 2
    made.clear()
    chosen = meet_psnr(checker, topology, Goal.of_psnr(target), budgets_at)
    assert made[:2] in ([0.5, 0.25], [0.5, 0.75]) and len(made) == 5  # a bisection: 1/2^5 <= 0.05 < 1/2^4
    record = chosen.curve["quality_target"]
    assert chosen.fidelity == f"psnr {target:g}" and record["achieved"]["psnr"] >= target
    assert all(row[1] < target for row in record["psnr_vs_density"] if row[0] < chosen.mean_density - 1e-4)
    assert chosen.mean_density < 0.5 + 0.02  # no denser than a measured point that met it
    with pytest.raises(SaexportError, match="not reached below density 1: the best measured is"):
        meet_psnr(checker, topology, Goal.of_psnr(60.0), budgets_at)
