"""Option groups shared by the commands, each building the object its options describe (Polygraphy's argument
groups, in click): `model_group` a `ModelSource`, `run_group` the run's `RunDefaults`, `calibration_group` a
`Calibration`, `goal_group` a FAST `Goal`, `rule_group` a `BudgetRule`, `output_group` an `Output`. A command
receives the objects, built and checked before any compute; a flag that does not apply to what the command will do
is refused, not ignored.

The library names Python parameters in its errors (in backticks); `clear_errors` turns each into the flag of the
running command that sets it. Nothing heavy is imported here: torch and diffusers load only when a command runs.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from saexport.errors import SaexportError
from saexport.models.presets import PRESETS, get_preset

log = logging.getLogger("saexport")
DEFAULT_MODEL = "wan2.1-demo"
DTYPE_NAMES = ("fp32", "fp16", "bf16")
PRESET_DEFAULT = "Default: the model's (see `saexport models`)."
FIDELITY_PRESETS = ("high", "medium", "low")  # saexport.topology.goals.FIDELITY_PRESETS (checked by a test)


class UserError(click.ClickException):
    """One line `Error: <message>`, exit status 2 (the shell's usage-error code)."""

    exit_code = 2


def flag_names(message: str, context: click.Context | None = None) -> str:
    """The library's `parameter` names in `message` as the running command's flags (`steps` -> --steps)."""
    context = context or click.get_current_context(silent=True)
    if context is None:
        return message
    flags = {}
    for param in context.command.params:
        if isinstance(param, click.Option):
            long = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
            flags[param.name] = long
            flags[long.removeprefix("--").replace("-", "_")] = long
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m[1], m[0]), message)


def user_error(error: SaexportError) -> UserError:
    return UserError(flag_names(str(error)))


RESUMING_COMMANDS = ("topology", "budgets", "build")  # their calibrations keep their progress


def clear_errors(command: Callable) -> Callable:
    """Bad input ends with `Error: <what and how to fix it>` and exit status 2, not a traceback; Ctrl-C says what
    happens on a rerun: the calibrating commands resume, the others start again (nothing half-written is kept)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SaexportError as e:
            raise user_error(e) from None
        except OSError as e:  # ENOSPC, EACCES, ENOTDIR, ... while writing: the file and the fix, in one line
            from saexport.folders import os_error_message

            raise UserError(os_error_message(e, action="read or write")) from None
        except KeyboardInterrupt:
            context = click.get_current_context(silent=True)
            if context is not None and context.info_name in RESUMING_COMMANDS:
                click.echo("\ninterrupted — rerun the same command to resume", err=True)
            else:
                click.echo("\ninterrupted — nothing half-written was kept; rerun the command to start again", err=True)
            raise SystemExit(130) from None

    return wrapper


def join_launch() -> None:
    """Under torchrun (`RANK` set): join the launch's ranks, over which the calibration's prompt x seed work is
    spread; ranks other than 0 log errors only (rank 0 shows progress and writes)."""
    import os

    if "RANK" not in os.environ:
        return
    from saexport.runtime.parallel.launch import join_ranks, writes_outputs

    join_ranks()
    if not writes_outputs():
        log.setLevel(logging.ERROR)


class stage:  # noqa: N801  (a context manager used like a statement)
    """Logs `name ...` then `name: done in N s`: every long step says what it is doing."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        log.info("%s ...", self.name)
        self.start = time.perf_counter()

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            log.info("%s: done in %.1f s", self.name, time.perf_counter() - self.start)


# ---------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class OptionGroup:
    """Options that build one object: `group(command)` adds the options and hands the command `name=build(...)`
    instead of the options' values. `build` receives the values by the options' names; it may read the other
    options through `given(name)` / `was_given(name)`."""

    name: str
    options: tuple[Callable, ...]
    build: Callable[..., object]

    def __call__(self, command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            try:
                kwargs[self.name] = self.build(**values)
            except SaexportError as e:
                raise user_error(e) from None
            return command(**kwargs)

        wrapper.__click_params__ = list(getattr(command, "__click_params__", []))
        for option in reversed(self.options):
            option(wrapper)
        names = [param.name for param in wrapper.__click_params__[-len(self.options):]]
        return wrapper


def given(name: str):
    """The value of the running command's option `name`."""
    return click.get_current_context().params.get(name)


def was_given(name: str) -> bool:
    """Whether the user set option `name` (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def refuse_unused(flags: dict[str, str], why: str) -> None:
    """Refuse the options among `flags` (name -> flag) that the user set although they do nothing here."""
    used = [flag for name, flag in flags.items() if was_given(name)]
    if used:
        raise SaexportError(f"{', '.join(used)} {'has' if len(used) == 1 else 'have'} no effect {why}")


def _model_source(model: str, weights: Path | None, random_weights: bool, weights_seed: int):
    from saexport.models.checkpoint import ModelSource

    if random_weights and weights is not None:
        raise SaexportError("give either --weights or --random-weights, not both")
    if was_given("weights_seed") and not random_weights:
        raise SaexportError("--weights-seed seeds --random-weights: give both, or neither")
    return ModelSource(model, weights, random_weights, weights_seed)


model_group = OptionGroup("source", (
    click.option("--model", default=DEFAULT_MODEL, show_default=True, type=click.Choice(list(PRESETS)),
                 help="Architecture preset."),
    click.option("--weights", type=click.Path(path_type=Path),
                 help="Checkpoint folder (diffusers or original Wan layout); wan2.1-demo's ships with saexport."),
    click.option("--random-weights", is_flag=True, help="Random weights, for benchmarks only (marked in every "
                                                        "artifact)."),
    click.option("--weights-seed", default=0, show_default=True, help="Seed of --random-weights."),
), _model_source)


def _run(resolution=None, frames=None, block_size=None, layout=None, dtype_name=None, steps=None):
    from saexport.pipeline import resolve_run

    return resolve_run(given("model"), resolution=resolution, frames=frames, block_size=block_size, layout=layout,
                       dtype=dtype_name, steps=steps)


RUN_OPTIONS = {
    "video": (click.option("--resolution", help=f"480p, 720p or WIDTHxHEIGHT. {PRESET_DEFAULT}"),
              click.option("--frames", type=int, help=f"Video frames (4k+1 with Wan's VAE). {PRESET_DEFAULT}")),
    "blocks": (click.option("--block-size", type=int, help=f"Attention block size. {PRESET_DEFAULT}"),
               click.option("--layout", help=f"identity, tile3d or tile3d:FxHxW. {PRESET_DEFAULT}")),
    "dtype": (click.option("--dtype", "dtype_name", type=click.Choice(DTYPE_NAMES), help=f"Precision. "
                                                                                         f"{PRESET_DEFAULT}"),),
    "steps": (click.option("--steps", type=click.IntRange(min=1), help=f"Denoising steps. {PRESET_DEFAULT}"),),
}


def run_group(*parts: str) -> OptionGroup:
    """The run's `RunDefaults` from the options of `parts` (video, blocks, dtype, steps); the rest: the model's."""
    return OptionGroup("run", tuple(option for part in parts for option in RUN_OPTIONS[part]), _run)


def check_device(device: str) -> str:
    """--device as a torch device name (auto: cuda where there is one), refused where this torch has no GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise SaexportError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaexportError(f"--device {device}: this torch has no CUDA device (a CPU build, or no GPU): use "
                            "--device cpu")
    return device


def _calibration(prompts: int, embeddings_file: Path | None, seeds: str, calib_guidance: float, calib_passes: str,
                 device: str, steps: int | None, rows_per_block: int, aggregation: str = "min",
                 check_prompts: int | None = None):
    from saexport.pipeline import Calibration

    passes = tuple(p.strip() for p in calib_passes.split(",") if p.strip())
    return Calibration(prompts, embeddings_file, tuple(int_list(seeds, "--seeds")), rows_per_block, calib_guidance,
                       passes, check_device(device), aggregation, steps, check_prompts, check_prompts)


CALIBRATION_OPTIONS = (
    click.option("--prompts", default=4, show_default=True, type=click.IntRange(min=1),
                 help="Calibration prompts (built-in prompts through the checkpoint's text encoder; synthetic "
                      "without one)."),
    click.option("--calib-embeddings", "embeddings_file", type=click.Path(path_type=Path),
                 help="safetensors: `embeddings` [prompts, text_len, text_dim] (e.g. UMT5 output)."),
    click.option("--seeds", default="0", show_default=True, help="Comma-separated latent seeds."),
    click.option("--calib-guidance", default=5.0, show_default=True,
                 help="Guidance scale of the calibration loop (generation's; 1 runs one pass)."),
    click.option("--calib-passes", default="cond,uncond", show_default=True,
                 help="Which passes of a guided step the probes measure."),
    click.option("--device", default="auto", show_default=True,
                 help="Calibration device: cuda, cpu, or auto (cuda where there is one)."),
    click.option("--steps", type=click.IntRange(min=1), help=f"Sampler steps of the loop. {PRESET_DEFAULT}"),
    click.option("--rows-per-block", default=16, show_default=True, type=click.IntRange(min=1),
                 help="Query rows sampled per block (WEST; FAST v1)."),
)
AGGREGATION_OPTION = click.option(
    "--aggregation", default="min", show_default=True,
    type=click.Choice(["min", "prompt-min-of-step-mean", "quantile", "mean-score"]),
    help="How WEST combines its calibration runs into one map.")


CHECK_OPTION = click.option("--check-prompts", type=click.IntRange(min=1),
                            help="Held-out calibration prompts a quality target is checked on, and prompts of the "
                                 "fidelity report. Default: 8 on a GPU, 2 on a CPU.")


def calibration_group(west: bool, fast: bool) -> OptionGroup:
    """The calibration's options; `west`: the command runs WEST (its aggregation applies); `fast`: it runs FAST
    (a quality target's checks apply)."""
    return OptionGroup("calibration", CALIBRATION_OPTIONS + ((AGGREGATION_OPTION,) if west else ())
                       + ((CHECK_OPTION,) if fast else ()), _calibration)


def _goal(fidelity: str, target_psnr: float | None, density: float | None):
    from saexport.topology.goals import Goal

    chosen = [flag for name, flag in (("fidelity", "--fidelity"), ("target_psnr", "--target-psnr"),
                                      ("density", "--density")) if was_given(name)]
    if len(chosen) > 1:
        raise SaexportError(f"give one of --fidelity, --target-psnr and --density, not {' and '.join(chosen)}")
    if target_psnr is not None:
        return Goal.of_psnr(target_psnr)
    if density is not None:
        return Goal.of_density(density)
    return Goal.preset(fidelity)


goal_group = OptionGroup("goal", (
    click.option("--fidelity", type=click.Choice(FIDELITY_PRESETS), default="high", show_default=True,
                 help="The quality FAST must deliver: PSNR against the dense video on held-out calibration "
                      "prompts, high 30 dB, medium 26 dB, low 22 dB; FAST finds the least attention work that meets "
                      "it."),
    click.option("--target-psnr", type=float, help="Any other quality target, in dB (FAST v2)."),
    click.option("--density", type=float, help="A mean density of kept blocks instead of a quality, in (0, 1]."),
), _goal)

V2_FLAGS = {"proxy": "--proxy", "warmup": "--warmup", "rows_per_head": "--rows-per-head",
            "sensitivity": "--sensitivity/--no-sensitivity", "sensitivity_prompts": "--sensitivity-prompts"}
RULE_OPTIONS = (
    click.option("--rule", default="v2", show_default=True, type=click.Choice(["v1", "v2"]),
                 help="FAST's allocation: v2 w*Q - lambda*density with end-to-end sensitivity weights; v1 graded "
                      "fidelity targets (cheaper to calibrate, 3-4 dB worse)."),
    click.option("--proxy", default="output", show_default=True, type=click.Choice(["hellinger", "output", "residual"]),
                 help="v2's quality proxy: Hellinger fidelity, attention-output error, or the gated residual "
                      "update's error."),
    click.option("--warmup", default="0", show_default=True,
                 help="v2: dense warm-up steps counted inside the density goal, or auto."),
    click.option("--rows-per-head", default=16, show_default=True, type=click.IntRange(min=1),
                 help="v2: query rows sampled per head for the proxy."),
    click.option("--sensitivity-prompts", default=1, show_default=True, type=click.IntRange(min=1),
                 help="v2: calibration prompts the sensitivity is measured on (each costs 1 + 5 + layers whole "
                      "generations)."),
    click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
                 help="v2: weight steps and layers by their measured end-to-end sensitivity."),
)


def rule_group(runs_west: bool) -> OptionGroup:
    """FAST's `BudgetRule`; `runs_west`: the command also runs WEST, which reads --rows-per-block (without WEST only
    FAST v1 does)."""

    def build(rule: str, proxy: str, warmup: str, rows_per_head: int, sensitivity_prompts: int, sensitivity: bool):
        from saexport.topology.goals import WARMUP_AUTO, BudgetRule

        if rule == "v1":  # v1 reads none of v2's settings: one given is a mistake, not a no-op
            refuse_unused(V2_FLAGS, "with --rule v1 (FAST v1 ignores it)")
        elif not runs_west:
            refuse_unused({"rows_per_block": "--rows-per-block"}, "with --rule v2 (its proxy samples "
                                                                  "--rows-per-head)")
        if warmup != WARMUP_AUTO:
            try:
                warmup = int(warmup)
            except ValueError:
                raise SaexportError(f"`warmup` must be a number of steps or auto, got '{warmup}'") from None
        return BudgetRule(rule, proxy, warmup, rows_per_head, sensitivity, sensitivity_prompts=sensitivity_prompts)

    return OptionGroup("rule", RULE_OPTIONS, build)


def output_group(help_text: str) -> OptionGroup:
    """`--out` and `--overwrite`, as one `Output`."""
    from saexport.folders import Output

    return OptionGroup("out", (
        click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help=help_text),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing output that saexport did not write (or that was edited since)."),
    ), lambda out_path, overwrite: Output(out_path, overwrite))


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SaexportError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values:
        raise SaexportError(f"{option} needs at least one integer")
    return values


def model_default(name: str) -> object:
    """The running command's model's default of run setting `name` (its preset's)."""
    return getattr(get_preset(given("model")).defaults, name)
