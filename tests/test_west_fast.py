import math
from dataclasses import replace

import pytest
import torch

from saexport.artifacts import BlockedGrid, Topology
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.levels import density, levels_from_scores
from saexport.models.processors import block_masses
from saexport.models.text_encoder import synthetic_embeddings
from saexport.topology.calibration import CalibrationLoop, Calibrator, SampledRows
from saexport.topology.fast import (
    choose_levels,
    compute_hellinger_quality,
    fit_budgets_v1,
    hellinger,
    hellinger_curves,
    hellinger_quality_of_kept_mass,
)
from saexport.topology.goals import DENSITY_GOALS, Goal
from saexport.topology.prompts import CalibrationSet
from saexport.topology.west import AGGREGATIONS, Aggregation, ThresholdMap, block_scores, compute_topology
from tests.interrupts import Interrupt, interrupt_after

LOOP = CalibrationLoop(seeds=(0,), steps=4, flow_shift=3.0)  # guided, both passes measured: as generation runs
BLOCKS = BlockedGrid((3, 4, 4), 8, parse_layout("tile3d:1x2x4"))


def quiet(items, **_):
    return items


def calibrator(loaded, prompts, loop=LOOP, **settings) -> Calibrator:
    return Calibrator(loaded, prompts, loop, progress=settings.pop("progress", quiet), **settings)


def test_threshold_map_is_min_over_runs_of_rank_levels_with_kept_diagonal():
    # Two runs over a 2x2 map (n^2 = 4 pairs): ranks 1..4 give levels 1, 64, 128, 192.
    run1 = torch.tensor([[0.4, 0.3], [0.2, 0.1]])  # ranks 1 2 / 3 4
    run2 = torch.tensor([[0.1, 0.2], [0.4, 0.3]])  # ranks 4 3 / 1 2
    threshold = ThresholdMap(layers=1, heads=1, n=2)
    threshold.add_run(0, run1[None])
    threshold.add_run(0, run2[None])
    levels = threshold.result()[0, 0]
    assert levels.tolist() == [[0, 64], [1, 0]]  # off-diagonal: min(64, 128) and min(128, 1)


def with_diagonal(levels: torch.Tensor) -> torch.Tensor:
    levels = levels.clone()
    n = levels.shape[-1]
    levels[..., torch.arange(n), torch.arange(n)] = 0
    return levels


def test_every_aggregation_against_its_definition():
    # 3 trajectories x 4 runs, one layer, 2 heads, n = 5
    runs = torch.rand(3, 4, 1, 2, 5, 5) ** 3
    levels = levels_from_scores(runs)  # per-run levels

    def aggregate(aggregation, **settings):
        threshold = ThresholdMap(1, 2, 5, Aggregation(aggregation, **settings))
        for trajectory in runs:
            measured = threshold.empty()
            for scores in trajectory:
                measured.add_run(0, scores[0])
            threshold.merge(measured.state())
        return threshold.result()

    every_run = levels.flatten(0, 1)  # [12, 1, 2, 5, 5]
    assert torch.equal(aggregate("min"), with_diagonal(every_run.min(0).values))
    assert torch.equal(aggregate("mean-score"), with_diagonal(levels_from_scores(runs.mean(dim=(0, 1)))))
    per_trajectory = levels_from_scores(runs.mean(1))  # [3, 1, 2, 5, 5]
    assert torch.equal(aggregate("prompt-min-of-step-mean"), with_diagonal(per_trajectory.min(0).values))
    third = every_run.sort(0).values[3]  # ceil(0.3 * 12) = 4th smallest
    assert torch.equal(aggregate("quantile", quantile=0.3, stride=1), with_diagonal(third))
    assert torch.equal(aggregate("quantile", quantile=0.3, stride=4), with_diagonal(third // 4 * 4))
    assert torch.equal(aggregate("quantile", quantile=0.0, stride=1), aggregate("min"))
    # the quantile map is never below the minimum, and the median never below the 10% quantile
    assert torch.all(aggregate("quantile", quantile=0.5) >= aggregate("quantile", quantile=0.1, stride=4))
    assert AGGREGATIONS == ("min", "prompt-min-of-step-mean", "quantile", "mean-score")
    with pytest.raises(SaexportError, match="`aggregation` must be one of .*, got .max."):
        Aggregation("max")


def test_mean_score_ties_share_the_best_level():
    run1 = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    run2 = torch.tensor([[0.1, 0.2], [0.4, 0.3]])
    threshold = ThresholdMap(layers=1, heads=1, n=2, aggregation=Aggregation("mean-score"))
    threshold.add_run(0, run1[None])
    threshold.add_run(0, run2[None])
    # mean [[0.25, 0.25], [0.3, 0.2]]: ranks 2, 2 / 1, 4 -> levels 64, 64 / 1, 192; the diagonal is structural
    assert threshold.result()[0, 0].tolist() == [[0, 64], [1, 0]]


def test_block_scores_are_mean_probability_per_pair_with_partial_last_block():
    rows = SampledRows(rows=torch.tensor([0, 1, 4]), block=torch.tensor([0, 0, 1]))
    masses = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.2, 0.8]]])  # [heads=1, R=3, n=2]; L = 5, block 4
    scores = block_scores(masses, rows, seq_len=5, block_size=4)[0]
    assert torch.allclose(scores, torch.tensor([[0.625 / 4, 0.375 / 1], [0.2 / 4, 0.8 / 1]], dtype=torch.float64))


def test_block_masses_match_the_full_softmax():
    q, k = torch.randn(1, 37, 2, 8), torch.randn(1, 37, 2, 8)
    rows = torch.tensor([0, 5, 36])
    got = block_masses(q, k, rows, block_size=16, chunk=2)
    probs = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(8), -1)[:, :, rows]
    want = torch.stack([probs[..., :16].sum(-1), probs[..., 16:32].sum(-1), probs[..., 32:].sum(-1)], -1)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(-1), torch.ones(1, 2, 3))


def test_hellinger_on_known_distributions():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert hellinger(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert hellinger(p, torch.tensor([0.0, 0.0, 1.0])).item() == pytest.approx(1.0)
    q = torch.tensor([1.0, 0.0, 0.0])  # BC = sqrt(0.5)
    assert hellinger(p, q).item() == pytest.approx(math.sqrt(1 - math.sqrt(0.5)))


def test_fidelity_of_a_renormalised_restriction_is_a_function_of_kept_mass():
    dense = torch.softmax(torch.randn(50), 0)
    kept = torch.rand(50) < 0.4
    sparse = torch.where(kept, dense, 0) / dense[kept].sum()
    expected = hellinger_quality_of_kept_mass(dense[kept].sum()).item()
    assert (1 - hellinger(dense, sparse)).item() == pytest.approx(expected)


def test_fidelity_curves_count_kept_mass_per_level():
    masses = torch.tensor([[[[0.6, 0.3, 0.1]]]])  # batch 1, head 1, one row, n = 3
    levels = torch.tensor([[[0, 100, 200]]])
    curve = hellinger_curves(masses, levels)[0]
    for level, mass in [(0, 0.6), (99, 0.6), (100, 0.9), (199, 0.9), (200, 1.0), (255, 1.0)]:
        assert curve[level].item() == pytest.approx(hellinger_quality_of_kept_mass(torch.tensor(mass)).item())


def test_choose_levels_takes_the_lowest_level_reaching_the_target():
    fidelity = torch.linspace(0, 1, 256, dtype=torch.float64).expand(2, 1, 1, 256)
    levels = choose_levels(fidelity, torch.tensor([[0.5], [2.0]], dtype=torch.float64))
    assert levels[0, 0, 0].item() == 128 and levels[1, 0, 0].item() == 255  # unreachable -> dense


@pytest.fixture
def calibrated(tiny):
    embeddings = synthetic_embeddings(tiny.preset.text_len, 32, prompts=3, seed=int(torch.randint(0, 99, ())))
    prompts = CalibrationSet(embeddings[:2], embeddings[2:], "test")
    topology = compute_topology(calibrator(tiny, prompts), BLOCKS, rows_per_block=4)
    return tiny, prompts, topology


def test_whole_chain_meets_every_density_goal(calibrated, tmp_path):
    tiny, embeddings, topology = calibrated
    assert topology.levels.shape == (2, 4, 6, 6)
    assert (topology.levels.diagonal(dim1=-2, dim2=-1) == 0).all()
    quality = compute_hellinger_quality(calibrator(tiny, embeddings, replace(LOOP, seeds=(1,))), topology,
                                        rows_per_block=4)
    assert quality.shape == (4, 2, 4, 256)
    assert torch.all(quality[..., 1:] >= quality[..., :-1] - 1e-12)  # more kept, more faithful
    assert torch.allclose(quality[..., 255], torch.ones(()).double(), atol=1e-6)
    for preset, goal in DENSITY_GOALS.items():
        budgets = fit_budgets_v1(topology, quality, Goal(preset, density=DENSITY_GOALS[preset]))
        assert budgets.fidelity == preset
        assert abs(budgets.mean_density - goal) <= 0.02
        assert budgets.mean_density == pytest.approx(float(density(topology.levels, budgets.levels).mean()))
        budgets.check_matches(topology, steps=4)
        # The grading kept is the one with the most quality among those that reach the goal.
        reaching = [c for c in budgets.curve["candidates"] if abs(c[2] - goal) <= 0.01]
        assert budgets.curve["growth"] == max(reaching, key=lambda c: c[1])[0]
        assert budgets.curve["mean_fidelity"] == pytest.approx(
            float(quality.gather(-1, budgets.levels.long().unsqueeze(-1)).mean()))
    by_density = fit_budgets_v1(topology, quality, Goal.of_density(0.6))
    assert by_density.fidelity == "density 0.6" and abs(by_density.mean_density - 0.6) <= 0.02
    topology.save(tmp_path / "t.safetensors")
    assert Topology.load(tmp_path / "t.safetensors").calibration["method"] == "WEST"


def test_same_inputs_give_the_same_topology(calibrated):
    tiny, embeddings, topology = calibrated
    again = compute_topology(calibrator(tiny, embeddings), BLOCKS, rows_per_block=4)
    assert torch.equal(again.levels, topology.levels) and again.hash() == topology.hash()
    # The unconditional pass is measured too: probing the conditional pass alone gives another map.
    cond_only = compute_topology(calibrator(tiny, embeddings, replace(LOOP, passes=("cond",))), BLOCKS,
                                 rows_per_block=4)
    assert not torch.equal(cond_only.levels, topology.levels)
    assert cond_only.calibration["passes"] == ["cond"] and topology.calibration["passes"] == ["cond", "uncond"]


def test_empty_calibration_set_and_unknown_goals(calibrated):
    tiny, embeddings, topology = calibrated
    with pytest.raises(SaexportError, match="calibration set is empty"):
        compute_topology(calibrator(tiny, CalibrationSet(embeddings.embeddings[:0], embeddings.negative, "none")),
                         BlockedGrid((3, 4, 4), 8, parse_layout("identity")))
    with pytest.raises(SaexportError, match="`fidelity` must be one of high, medium, low, got 'ultra'"):
        Goal.preset("ultra")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SaexportError, match=r"`density` must be in \(0, 1\]"):
            Goal.of_density(bad)


def test_interrupted_calibration_resumes_and_gives_the_same_files(calibrated, tmp_path):
    tiny, embeddings, full = calibrated  # 2 prompts x 1 seed x 4 steps x 2 passes, uninterrupted
    checkpoint = tmp_path / "topology.safetensors.partial"
    with pytest.raises(Interrupt):  # stops in the second trajectory, after the first (8 passes) has finished
        compute_topology(calibrator(tiny, embeddings, progress=interrupt_after(10), progress_file=checkpoint),
                         BLOCKS, 4)
    assert checkpoint.exists()
    walked = []
    resumed = compute_topology(calibrator(tiny, embeddings, progress=lambda it, **_: walked.append(len(it)) or it,
                                          progress_file=checkpoint), BLOCKS, 4)
    assert walked == [8]  # only the unfinished trajectory: 4 steps x 2 passes
    assert torch.equal(resumed.levels, full.levels) and not checkpoint.exists()

    loop = replace(LOOP, seeds=(1,))
    whole = compute_hellinger_quality(calibrator(tiny, embeddings, loop), full, 4)
    with pytest.raises(Interrupt):
        compute_hellinger_quality(calibrator(tiny, embeddings, loop, progress=interrupt_after(10),
                                             progress_file=checkpoint), full, 4)
    assert torch.allclose(compute_hellinger_quality(calibrator(tiny, embeddings, loop, progress_file=checkpoint),
                                                    full, 4), whole)


def test_aggregations_along_the_loop_record_themselves_and_resume(calibrated, tmp_path):
    tiny, embeddings, minimum = calibrated  # "min", 2 prompts x 1 seed x 4 steps x 2 passes
    assert minimum.calibration["aggregation"] == "min"
    # the 0-quantile of per-run levels, exact (stride 1), is the minimum over runs
    zero = compute_topology(calibrator(tiny, embeddings), BLOCKS, 4, Aggregation("quantile", quantile=0.0, stride=1))
    assert torch.equal(zero.levels, minimum.levels)
    recorded = {key: zero.calibration[key] for key in ("aggregation", "quantile", "quantile_stride")}
    assert recorded == {"aggregation": "quantile", "quantile": 0.0, "quantile_stride": 1}
    # prompt-min-of-step-mean over one prompt is the mean score over its runs
    one = calibrator(tiny, CalibrationSet(embeddings.embeddings[:1], embeddings.negative, "one"))
    assert torch.equal(compute_topology(one, BLOCKS, 4, Aggregation("prompt-min-of-step-mean")).levels,
                       compute_topology(one, BLOCKS, 4, Aggregation("mean-score")).levels)
    # an interrupted prompt-min calibration resumes to the same map (the finished trajectory is folded once)
    prompt_min = Aggregation("prompt-min-of-step-mean")
    whole = compute_topology(calibrator(tiny, embeddings), BLOCKS, 4, prompt_min)
    assert whole.calibration["aggregation"] == "prompt-min-of-step-mean"
    assert not torch.equal(whole.levels, minimum.levels)
    checkpoint = tmp_path / "west.partial"
    with pytest.raises(Interrupt):
        compute_topology(calibrator(tiny, embeddings, progress=interrupt_after(10), progress_file=checkpoint),
                         BLOCKS, 4, prompt_min)
    resumed = compute_topology(calibrator(tiny, embeddings, progress_file=checkpoint), BLOCKS, 4, prompt_min)
    assert torch.equal(resumed.levels, whole.levels) and not checkpoint.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_the_rank_update_on_the_gpu_is_the_cpus(aggregation):
    """Same probes, same map: block sums, ranks and every aggregation give the CPU's levels on the GPU."""
    heads, n, block = 3, 12, 16
    seq_len = n * block - 5  # a short last block
    rows = SampledRows.draw(seq_len, block, 4, seed=1)
    maps = {}
    for device in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(5)
        threshold = ThresholdMap(2, heads, n, Aggregation(aggregation, stride=1), device=device)
        for _ in range(2):  # trajectories of 3 runs
            measured = threshold.empty()
            for _ in range(3):
                for layer in range(2):
                    masses = torch.softmax(torch.randn(heads, len(rows.rows), n, generator=gen) * 3, -1)
                    masses[..., 0] = 0.0  # exact ties: a column of zeros
                    measured.add_run(layer, block_scores(masses.to(device), rows, seq_len, block))
            threshold.merge(measured.state())
        maps[device] = threshold.result()
    assert maps["cuda"].device.type == "cpu"
    assert torch.equal(maps["cpu"], maps["cuda"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_masses_on_the_gpu_match_the_cpu(dtype):
    """The fused probe kernel where Triton is installed, else bf16 q, k through TF32 products (exact for bf16
    inputs) and fp32 through fp32 products: the CPU's masses either way."""
    q, k = (torch.randn(2, 300, 3, 64).to(dtype) for _ in range(2))
    rows = torch.tensor([0, 7, 150, 299])
    on_cpu = block_masses(q, k, rows, block_size=64)
    on_gpu = block_masses(q.cuda(), k.cuda(), rows, block_size=64).cpu()
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-6)
    assert torch.backends.cuda.matmul.fp32_precision != "tf32"  # the setting is restored


@pytest.mark.gpu
def test_west_on_the_gpu_gives_the_cpu_map(tiny):
    """The whole calibration (fp32 tiny model) on both devices: the same map up to near-ties, whose fp32 sums
    round differently (a swap of neighbouring ranks moves a level by one rank step)."""
    embeddings = synthetic_embeddings(tiny.preset.text_len, 32, prompts=3, seed=int(torch.randint(0, 99, ())))
    prompts = CalibrationSet(embeddings[:2], embeddings[2:], "test")
    blocks = BlockedGrid((3, 8, 8), 8, parse_layout("tile3d:1x2x4"))
    on_cpu = compute_topology(calibrator(tiny, prompts, device="cpu"), blocks, 4).levels.int()
    on_gpu = compute_topology(calibrator(tiny, prompts, device="cuda"), blocks, 4).levels.int()
    n = on_cpu.shape[-1]
    differs = on_cpu != on_gpu
    assert differs.float().mean() <= 0.02, f"{int(differs.sum())} of {differs.numel()} pairs differ"
    assert (on_cpu - on_gpu).abs().max() <= 2 * math.ceil(255 / n**2)
