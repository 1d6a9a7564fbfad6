"""One rank of tests/test_parallel_calibration.py's launches (torchrun, gloo on the CPU): the calibration's work
spread over the ranks, each rank saving what it got."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from saexport.artifacts import BlockedGrid
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import synthetic_embeddings
from saexport.runtime.generation import model_identity
from saexport.runtime.parallel.spread import spread
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.prompts import CalibrationSet
from saexport.topology.quality import compute_quality
from saexport.topology.standin import standin_topology

LOOP = CalibrationLoop(seeds=(0, 5), steps=2, flow_shift=3.0)


def quality_setup(seed: int):
    """The tiny model (random weights of `seed`), 2 prompts x 2 seeds and a stand-in topology: 4 trajectories."""
    tiny = load_model("wan2.1-tiny", random_weights=True, seed=seed)
    embeddings = synthetic_embeddings(tiny.preset.text_len, 32, prompts=3, seed=seed)
    calibrator = Calibrator(tiny, CalibrationSet(embeddings[:2], embeddings[2:], "test"), LOOP,
                            progress=lambda items, **_: items)
    preset = tiny.preset
    topology = standin_topology(model_identity(tiny), preset.num_layers, preset.num_heads,
                                BlockedGrid((3, 4, 4), 8, parse_layout("tile3d:1x2x4")))
    return calibrator, topology


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    items = list(range(7))  # not a multiple of the ranks: the last round leaves ranks idle
    spread_results = list(spread(items, lambda item: (item, rank, item * item)))
    with torch.no_grad():
        quality = compute_quality(*quality_setup(args.seed), ("output",), rows_per_head=4)["output"]
    torch.save({"spread": spread_results, "quality": quality}, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
