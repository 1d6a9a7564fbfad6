"""Multi-rank runs (issue 23) on the CPU: heads balanced offline against a brute-force optimum, and Ulysses sequence
parallelism (yunchang, gloo) against the single-process forward."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import saexport
from saexport.artifacts import ArtifactFolder, BlockedGrid, Topology
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.levels import kept_blocks
from saexport.models.checkpoint import load_model
from saexport.runtime.generation import model_identity
from saexport.runtime.parallel import balance
from saexport.runtime.parallel.balance import (
    attention_overhead,
    balance_heads,
    balance_summary,
    balanced_head_order,
    check_ranks,
    contiguous_head_order,
    head_work,
    imbalance,
    rank_work,
)
from saexport.runtime.parallel.ulysses import ulysses_dit
from saexport.topology.standin import standin_budgets, standin_topology
from tests.parallel_worker import small_sparse_dit

WORKER = Path(__file__).parent / "parallel_worker.py"


def brute_force_optimum(work: list[int], ranks: int) -> int:
    """The least max rank work over every split of the heads into `ranks` groups of equal size."""
    per_rank = len(work) // ranks

    def best(left: tuple[int, ...]) -> int:
        if not left:
            return 0
        first, rest = left[0], left[1:]
        return min(max(work[first] + sum(work[h] for h in others), best(tuple(h for h in rest if h not in others)))
                   for others in itertools.combinations(rest, per_rank - 1))

    return best(tuple(range(len(work))))


@pytest.mark.parametrize("heads,ranks", [(8, 2), (8, 4), (6, 3), (6, 2), (12, 4)])
def test_balance_matches_the_brute_force_optimum(heads, ranks):
    gen = torch.Generator().manual_seed(1000 * heads + ranks)
    for case in range(20):
        # skewed work (a few heavy heads, as FAST's budgets give), or ties: both trouble greedy splits
        scale = torch.rand(heads, generator=gen) ** 3 if case % 2 else torch.ones(heads)
        work = (torch.randint(1, 5000, (heads,), generator=gen) * scale).round().long().tolist()
        groups, proven = balance_heads(work, ranks)
        assert sorted(h for g in groups for h in g) == list(range(heads))  # a permutation of the heads
        assert all(len(g) == heads // ranks for g in groups)
        assert max(sum(work[h] for h in g) for g in groups) == brute_force_optimum(work, ranks), (work, groups)
        assert proven


def test_search_cut_short_keeps_a_valid_assignment_no_worse_than_greedy(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    work = torch.randint(1, 10_000, (40,), generator=gen).tolist()
    groups, _ = balance_heads(work, 8)
    monkeypatch.setattr(balance, "SEARCH_NODES", 0)
    cut, _ = balance_heads(work, 8)
    for found in (groups, cut):
        assert sorted(h for g in found for h in g) == list(range(40)) and all(len(g) == 5 for g in found)
    optimum = max(sum(work[h] for h in g) for g in groups)
    mean = sum(work) / 8
    assert optimum <= max(sum(work[h] for h in g) for g in cut) <= 1.05 * mean


def test_head_work_counts_the_kept_block_pairs():
    gen = torch.Generator().manual_seed(3)
    levels = torch.randint(0, 256, (2, 4, 7, 7), generator=gen, dtype=torch.uint8)
    budgets = torch.randint(0, 256, (3, 2, 4), generator=gen, dtype=torch.uint8)
    work = head_work(levels, budgets)
    for s, layer in itertools.product(range(3), range(2)):
        expected = kept_blocks(levels[layer], budgets[s, layer]).sum((1, 2))
        assert torch.equal(work[s, layer], expected)
    assert work.unique().numel() > 10  # the case is not degenerate


def test_balanced_order_beats_the_split_by_index():
    gen = torch.Generator().manual_seed(11)
    work = (torch.randint(1, 4000, (5, 3, 8), generator=gen) * torch.rand(5, 3, 8, generator=gen) ** 2).long()
    for ranks in (2, 4):
        balanced = balanced_head_order(work, ranks)
        naive = contiguous_head_order(work, ranks)
        assert balanced.proven == 15
        assert all(sorted(row.tolist()) == list(range(8)) for row in balanced.order.flatten(0, 1))
        loads = rank_work(work, balanced.order, ranks)
        assert torch.equal(loads.sum(-1), work.sum(-1))  # every head's work counted once
        before, after = imbalance(work, naive.order, ranks), imbalance(work, balanced.order, ranks)
        assert (after <= before + 1e-12).all() and after.mean() < before.mean() - 0.05


def test_the_summary_says_how_much_longer_attention_takes_than_a_perfect_balance():
    # two entries of 4 heads on 2 ranks: (4, 4, 1, 1) splits evenly (5 | 5; by index 8 | 2); (30, 30, 30, 10) cannot
    # (60 | 40 at best, by index too). Time is work-weighted: (5 + 60) / (5 + 50) balanced, (8 + 60) / 55 by index.
    work = torch.tensor([[[4, 4, 1, 1]], [[30, 30, 30, 10]]])
    order = balanced_head_order(work, 2).order
    assert attention_overhead(work, order, 2) == pytest.approx(65 / 55 - 1)
    assert attention_overhead(work, contiguous_head_order(work, 2).order, 2) == pytest.approx(68 / 55 - 1)
    assert balance_summary(work, order, 2) == (
        "heads balanced over 2 ranks: attention 18.2% longer than a perfect balance, the worst layer and step 20.0% "
        "(heads split by index: 23.6% and 60.0%)")


@pytest.mark.parametrize("heads,ranks,says", [(8, 16, "more than the model's 8 heads"), (12, 8, "does not divide"),
                                              (8, 0, "at least 1")])
def test_bad_rank_counts_are_refused_in_one_line(heads, ranks, says):
    with pytest.raises(SaexportError) as refused:
        check_ranks(heads, ranks)
    message = str(refused.value)
    assert "`ranks`" in message and says in message and "\n" not in message
    with pytest.raises(SaexportError, match="`ranks`"):
        balanced_head_order(torch.ones(2, 2, heads, dtype=torch.int64), ranks)


def run_ranks(tmp_path: Path, ranks: int, *options: str) -> list[dict]:
    seed = int.from_bytes(os.urandom(2), "little")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), "--seed", str(seed), "--out", str(tmp_path), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(ranks)]


@pytest.mark.parametrize("ranks", [2, 4])
def test_ulysses_forward_equals_the_single_process_forward(tmp_path, ranks):
    results = run_ranks(tmp_path, ranks)
    reference = results[0]["reference"]
    step_order = results[0]["order"][1]  # [layers, heads] at the step the forward runs
    assert (step_order != torch.arange(4)).any(-1).all()  # every layer's heads are permuted
    for result in results:
        assert torch.equal(result["reference"], reference)  # every rank built the same model
        assert result["output"].shape == reference.shape
        torch.testing.assert_close(result["output"], reference, rtol=0, atol=1e-5)
    assert reference.abs().mean() > 0.1


def test_ulysses_split_by_index_also_equals_the_single_process_forward(tmp_path):
    results = run_ranks(tmp_path, 2, "--contiguous")
    assert torch.equal(results[0]["order"][1], torch.arange(4).expand(2, 4))
    for result in results:
        torch.testing.assert_close(result["output"], result["reference"], rtol=0, atol=1e-5)


def test_ranks_holding_different_artifacts_all_refuse(tmp_path):
    results = run_ranks(tmp_path, 2, "--mismatch")
    for result in results:
        assert result["refused"] is not None and "\n" not in result["refused"]
        assert "ranks [1] differ from rank 0" in result["refused"]


def test_ulysses_refuses_bad_setups_in_one_line(monkeypatch):
    dit = small_sparse_dit(seed=5)
    with pytest.raises(SaexportError, match="`degree` 3 does not divide the model's 4 heads"):
        ulysses_dit(dit, 3)
    with pytest.raises(SaexportError, match="torch.distributed initialised"):
        ulysses_dit(dit, 2)
    repeated = torch.tensor([0, 1, 1, 3]).expand(3, 2, 4)  # head 1 twice, head 2 never
    with pytest.raises(SaexportError, match="must be a permutation of the 4 heads"):
        ulysses_dit(dit, 2, repeated)
    monkeypatch.setitem(sys.modules, "yunchang", None)  # as if not installed
    with pytest.raises(SaexportError, match=r"pip install 'saexport\[parallel\]'"):
        ulysses_dit(dit, 2)


@pytest.mark.parametrize("ranks", [2, 4])
def test_cfg_parallel_sampling_equals_the_single_process_sampling(tmp_path, ranks):
    """2 ranks: one pass each; 4: each pass on a Ulysses group of 2."""
    results = run_ranks(tmp_path, ranks, "--cfg")
    reference = results[0]["reference"]
    assert reference.abs().mean() > 0.1
    for result in results:
        assert torch.equal(result["reference"], reference)
        torch.testing.assert_close(result["output"], reference, rtol=0, atol=1e-5)


def demo_artifacts(folder: Path) -> Path:
    """Stand-in topology and budgets of the demo model (bundled weights, pixels) at 16x16 x 2 frames: 128 tokens."""
    loaded = load_model("wan2.1-demo")
    preset = loaded.preset
    topology = standin_topology(model_identity(loaded), preset.num_layers, preset.num_heads,
                                BlockedGrid((2, 8, 8), 16, parse_layout("tile3d:1x4x4")))
    artifacts = ArtifactFolder(folder)
    topology.save(artifacts.topology)
    standin_budgets(topology, steps=2, target_density=0.3).save(artifacts.budgets)
    return folder


def test_load_runs_a_video_on_ulysses_and_cfg_ranks_as_on_one(tmp_path):
    """4 ranks: two Ulysses groups of 2, one per pass of each guided step, each rank calling `saexport.load`."""
    folder = demo_artifacts(tmp_path / "artifacts")
    results = run_ranks(tmp_path, 4, "--load", str(folder), "--ulysses", "2", "--cfg")
    reference = results[0]["reference"]
    assert reference.abs().mean() > 0.1
    for result in results:
        assert result["runs"] == "CfgParallelDenoiser over UlyssesWanDiT"
        torch.testing.assert_close(result["output"], reference, rtol=0, atol=1e-5)


def test_generate_under_torchrun_writes_one_video_equal_to_the_single_process_one(tmp_path):
    """`torchrun --nproc-per-node 4 -m saexport generate --ulysses 2 --cfg-parallel`: every rank samples, rank 0
    alone writes, reports and shows progress; the latents equal `saexport generate` in one process."""
    from safetensors.torch import load_file

    folder = demo_artifacts(tmp_path / "artifacts")
    common = ["-m", "saexport", "generate", "--artifacts", str(folder), "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads as each rank: the same summation order
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one.safetensors")], env=env,
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", *common,
               "--ulysses", "2", "--cfg-parallel", "--out", str(tmp_path / "four.safetensors")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("wrote ") == 1
    for said in ("[saexport] heads balanced over 2 ranks: ", "[saexport] note: SYNTHETIC prompt embeddings",
                 "sampling (torch, CFG parallel):   0%"):  # a bar starts once
        assert done.stderr.count(said) == 1, said
    one, four = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "four.safetensors")
    assert one.keys() == four.keys()
    for name in one:
        assert one[name].abs().mean() > 0.1
        torch.testing.assert_close(four[name], one[name], rtol=0, atol=1e-5)
    launched = subprocess.run([*command[:4], "--nproc-per-node=2", *command[5:-1], str(tmp_path / "x.safetensors")],
                              env=env, capture_output=True, text=True, timeout=180)
    assert launched.returncode != 0 and "--ulysses 2 with --cfg-parallel (x 2) runs on 4 ranks, 2 were launched" in (
        launched.stdout + launched.stderr)
    assert not (tmp_path / "x.safetensors").exists()


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of `rank` among the processes torchrun (`launcher`) started, from /proc (Linux)."""
    for children in Path(f"/proc/{launcher}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


def test_a_rank_killed_mid_run_stops_the_launch_naming_it_and_writes_nothing(tmp_path):
    """SIGKILL rank 1 of a 2-rank `generate --ulysses 2` once the sampler has taken steps: the launch ends within
    seconds (not the process group's 10-minute timeout) with torchrun's report naming the rank and its signal, and
    the output is not written."""
    import signal
    import threading
    import time

    folder = demo_artifacts(tmp_path / "artifacts")
    topology = Topology.load(ArtifactFolder(folder).topology)
    standin_budgets(topology, steps=400, target_density=0.3).save(ArtifactFolder(folder).budgets)  # a long run
    out = tmp_path / "video.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "saexport",
               "generate", "--artifacts", str(folder), "--ulysses", "2", "--out", str(out)]
    launch = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    output = bytearray()

    def read() -> None:
        for chunk in iter(lambda: launch.stdout.read1(4096), b""):
            output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while b"/400 [" not in output and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # tqdm's "k/400 [": the sampler is stepping
        assert launch.poll() is None, output.decode(errors="replace")[-3000:]
        victim = worker_of_rank(launch.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        code = launch.wait(timeout=120)
    finally:
        launch.kill()
    reader.join(timeout=10)
    text = output.decode(errors="replace")
    assert code != 0 and time.monotonic() - killed < 60
    assert "rank      : 1" in text and "Signal 9 (SIGKILL)" in text, text[-3000:]
    assert not out.exists()


def test_load_refuses_parallel_options_outside_torchrun(tmp_path, monkeypatch):
    folder = demo_artifacts(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SaexportError, match="launch every rank with torchrun"):
        saexport.load(folder, ulysses=2)
    with pytest.raises(SaexportError, match="`ulysses` must be at least 1"):
        saexport.load(folder, ulysses=0)
    with pytest.raises(SaexportError, match="run on the torch back end, not onnxruntime"):
        saexport.load(folder, "onnxruntime", cfg_parallel=True)
