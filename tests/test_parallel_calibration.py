"""Calibration across ranks (issue 23): `torchrun -m saexport build` spreads WEST's and FAST's prompt x seed work
over gloo ranks on the CPU and writes the single-process build byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from saexport.topology.quality import compute_quality
from tests.calibration_worker import quality_setup

WORKER = Path(__file__).parent / "calibration_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # each rank's threads: the same summation order in every process
# test_build's tiny build: 2 prompts x 2 seeds, 3 steps, FAST v2 with its sensitivity and report
BUILD = ["-m", "saexport", "build", "--model", "wan2.1-tiny", "--random-weights", "--steps", "3", "--prompts", "2",
         "--seeds", "0,5", "--device", "cpu", "--rows-per-block", "4", "--resolution", "64x64", "--frames", "9",
         "--block-size", "8", "--layout", "tile3d:1x2x4", "--dtype", "fp32", "--density", "0.2"]


def torchrun(ranks: int, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", *arguments], env=ENV, capture_output=True, text=True,
                          timeout=180)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def single_process_build(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("single") / "build"
    done = subprocess.run([sys.executable, *BUILD, "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return files_of(out)


@pytest.mark.parametrize("ranks", [2, 4])
def test_build_under_torchrun_writes_the_single_process_build_byte_for_byte(tmp_path, single_process_build, ranks):
    """Every file (topology, budgets, fidelity report and picture, build.json, ONNX, Triton repository) is the
    single-process one; rank 0 alone writes (no file more, no partial left) and prints the stages' fates once."""
    out = tmp_path / "build"
    done = torchrun(ranks, *BUILD, "--out", str(out))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("topology  ran") == 1 and done.stderr.count("[build] topology: running") == 1
    built = files_of(out)
    assert sorted(built) == sorted(single_process_build)
    for name, content in single_process_build.items():
        assert built[name] == content, name


def test_a_launch_of_more_ranks_than_calibration_trajectories_is_refused(tmp_path):
    out = tmp_path / "build"
    done = torchrun(3, *[arg if arg != "0,5" else "0" for arg in BUILD], "--out", str(out))  # 2 prompts x 1 seed
    assert done.returncode != 0
    assert ("Error: 3 ranks were launched for 2 calibration trajectories (--prompts x --seeds): launch at most 2 "
            "ranks") in done.stderr, done.stderr[-3000:]
    assert not {"topology.safetensors", "budgets.safetensors", "build.json"} & set(files_of(out))


def test_spread_work_is_merged_in_item_order_exactly_as_in_one_process(tmp_path):
    """Round-robin items come back to every rank in item order; FAST's quality table, float64 sums over 4
    trajectories, equals one process's bit for bit, and merging them in another order would not."""
    seed = int.from_bytes(os.urandom(2), "little")
    done = torchrun(2, str(WORKER), "--seed", str(seed), "--out", str(tmp_path))
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for result in results:
        assert result["spread"] == [(item, (item, item % 2, item * item)) for item in range(7)]
    calibrator, topology = quality_setup(seed)

    def quality() -> torch.Tensor:
        with torch.no_grad():
            return compute_quality(calibrator, topology, ("output",), rows_per_head=4)["output"]

    single = quality()
    for result in results:
        assert torch.equal(result["quality"], single), f"seed {seed}"
    # the comparison catches a split that merges out of order or drops a rank's items
    for mutated in (lambda items, compute: ((item, compute(item)) for item in reversed(items)),
                    lambda items, compute: ((item, compute(item)) for item in items[::2])):
        with mock.patch("saexport.topology.calibration.spread", mutated):
            assert not torch.equal(quality(), single), f"seed {seed}"
