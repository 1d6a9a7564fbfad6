"""What `saexport build --device cuda` costs on a full-size model, stage by stage, and the total computed (issue 25).

A whole build of Wan2.1-14B at 720p runs for hours, longer than one device call; so each calibration stage is run
here through the library code the build runs (`compute_topology`, `compute_quality`, `final_latents_of_tables`;
bf16 on the GPU, the CUDA kernel, random weights drawn on the GPU), on loops of 1 and of 2 sampler steps, and the
difference is the cost of one step of that stage (both guidance passes), free of the first call's set-up. The
total is those step costs times the step counts the build's defaults give:

- WEST: calibration prompts x steps probed steps;
- FAST v2's proxy: calibration prompts x steps probed steps;
- sensitivity: sensitivity prompts x (1 + buckets + layer groups) generations of `sensitivity_steps` steps, each
  counted at the dense step's cost (an upper bound: each is sparse in one bucket or one group);
- the quality search: check prompts x (dense + the candidates) generations, the candidates those
  `quality_target.meet_psnr` asks on its way to the density the evaluation model needed per preset;
- the fidelity report: report prompts x (dense + the chosen density) generations;
a sparse step's cost is interpolated linearly in density between the measured densities. Model loading, the ONNX
export and the Triton repository are not included (said in the table).

    python bench/build_cost.py --model wan2.1 --resolution 832x480 --frames 81 --out DIR
    python bench/build_cost.py --measured DIR/build_cost_wan2.1_832x480.json --out DIR  # totals again, no GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saexport.artifacts import BlockedGrid
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.video_shape import parse_video_shape
from saexport.pipeline import HELD_OUT_PROMPTS, Calibration
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.goals import BudgetRule
from saexport.topology.prompts import PromptSource
from saexport.topology.quality import compute_quality
from saexport.topology.quality_target import next_density
from saexport.topology.sensitivity import final_latents_of_tables, uniform_levels
from saexport.topology.west import compute_topology

DENSITIES = (0.15, 0.4, 0.85)  # sparse steps measured; others interpolated (dense = 1.0 measured too)
NEEDED = {"high": 0.725, "medium": 0.6, "low": 0.4}  # what each preset needed on wan2.1-eval, step 8,351 (H200)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_cost(run) -> tuple[float, float]:
    """Seconds of one sampler step of `run(steps)` (from loops of 1 and 2 steps), and the 1-step call's time."""
    seconds = []
    for steps in (1, 2):
        sync()
        start = time.perf_counter()
        run(steps)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds[1] - seconds[0], seconds[0]


def search(needed: float) -> list[float]:
    """The densities `meet_psnr` asks when the least that meets is `needed`."""
    low, high, asked = 0.0, 1.0, []
    while (density := next_density(low, high)) is not None:
        asked.append(density)
        high, low = (density, low) if density >= needed else (high, density)
    return asked


def measure_steps(args) -> dict:
    """Each stage's seconds a step on this device, and what the totals need of the model and device."""
    gpu = args.device.startswith("cuda")
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=torch.bfloat16 if gpu else torch.float32, random_weights=True,
                        random_device=args.device)
    loaded.transformer.to(args.device)
    load_s = time.perf_counter() - start
    preset, run = loaded.preset, loaded.preset.defaults
    video = parse_video_shape(args.resolution, args.frames, preset.codec)
    blocks = BlockedGrid(video.token_grid(preset.patch_size), run.block_size, parse_layout(run.layout))
    prompts = PromptSource(preset, 1, None, None).load()
    flow_shift = flow_shift_for(video.height)

    def calibrator(steps: int) -> Calibrator:
        return Calibrator(loaded, prompts, CalibrationLoop((0,), steps, flow_shift), args.device, 1,
                          progress=lambda it, **_: it)

    topology = compute_topology(calibrator(1), blocks)  # also the map the sparse steps below run on
    measured = {}

    def measure(name: str, run) -> None:
        measured[name] = step_cost(run)
        print(f"{name}: {measured[name][0]:.2f} s a step (the 1-step call {measured[name][1]:.2f} s)", flush=True)

    rule = BudgetRule()
    measure("west", lambda s: compute_topology(calibrator(s), blocks))
    measure("proxy", lambda s: compute_quality(calibrator(s), topology, (rule.proxy,), rule.rows_per_head))
    for density in (1.0, *DENSITIES):
        levels = None if density == 1.0 else uniform_levels(topology, density)

        def generate(steps: int, levels=levels):
            table = None if levels is None else levels.expand(steps, *levels.shape).contiguous()
            final_latents_of_tables(calibrator(steps), topology, [table])

        measure(f"generation {density:g}", generate)
    return {"card": torch.cuda.get_device_name() if gpu else "CPU", "model": args.model,
            "resolution": args.resolution, "frames": args.frames, "tokens": blocks.seq_len,
            "layers": preset.num_layers, "steps": run.steps, "load_s": round(load_s, 1),
            "step_seconds": {k: round(v[0], 3) for k, v in measured.items()},
            "first_call_seconds": {k: round(v[1], 3) for k, v in measured.items()}}


def totals(measured: dict) -> dict:
    """Each stage's minutes of a build with the current defaults, per preset, from the measured step costs."""
    seconds = measured["step_seconds"]
    points = sorted((float(name.split()[1]), cost) for name, cost in seconds.items() if name.startswith("generation"))

    def step(density: float) -> float:  # linear between the measured densities
        for (d0, t0), (d1, t1) in zip(points, points[1:], strict=False):
            if d0 <= density <= d1:
                return t0 + (t1 - t0) * (density - d0) / (d1 - d0)
        return points[0][1] if density < points[0][0] else points[-1][1]

    calibration, rule, steps, layers = Calibration(), BudgetRule(), measured["steps"], measured["layers"]
    held_out = HELD_OUT_PROMPTS["cuda"]
    groups = min(rule.layer_groups or layers, layers)
    fixed = {"WEST": calibration.prompts * steps * seconds["west"],
             "FAST proxy": calibration.prompts * steps * seconds["proxy"],
             "sensitivity": rule.sensitivity_prompts * (1 + rule.buckets + groups) * rule.sensitivity_loop(steps)
             * step(1.0)}
    print(f"\nbuild defaults: {calibration.prompts} calibration prompts x {steps} steps; sensitivity "
          f"{rule.sensitivity_prompts} prompt x (1 + {rule.buckets} + {groups}) generations of "
          f"{rule.sensitivity_loop(steps)} steps; {held_out} check prompts and {held_out} report prompts")
    print("| preset | candidates | WEST min | proxy min | sensitivity min | quality search min | report min | "
          "total min |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    result = {}
    for preset_name, needed in NEEDED.items():
        asked = search(needed)
        stages = {**fixed, "quality search": held_out * steps * (step(1.0) + sum(step(d) for d in asked)),
                  "report": held_out * steps * (step(1.0) + step(needed))}
        total = sum(stages.values())
        result[preset_name] = {k: round(v, 1) for k, v in stages.items()} | {"total": round(total, 1),
                                                                              "candidates": len(asked)}
        print(f"| {preset_name} | {len(asked)} | " + " | ".join(f"{v / 60:.1f}" for v in stages.values())
              + f" | {total / 60:.1f} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1")
    parser.add_argument("--resolution", default="832x480")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measured", type=Path, help="a JSON this bench wrote: recompute the totals from its steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    measured = json.loads(args.measured.read_text()) if args.measured else measure_steps(args)
    print(f"{measured['card']}: {measured['model']} at {measured['resolution']} x {measured['frames']} "
          f"({measured['tokens']} tokens, {measured['layers']} layers), random weights; one sample a pass")
    print("| stage step (both passes) | s per step |")
    print("| --- | --- |")
    for name, per_step in measured["step_seconds"].items():
        print(f"| {name} | {per_step:.2f} |")
    measured["presets"] = totals(measured)
    (args.out / f"build_cost_{measured['model']}_{measured['resolution']}.json").write_text(
        json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
