"""Option groups shared by the commands, and the objects they build (polygraphy's argument groups, in click).

Nothing heavy is imported here: torch and diffusers load only when a command runs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import click

from saexport.errors import SaexportError
from saexport.models.presets import PRESETS

log = logging.getLogger("saexport")
DEFAULT_MODEL = "wan2.1-demo"
DTYPE_NAMES = ("fp32", "fp16", "bf16")
PRESET_DEFAULT = "Default: the model's (see `saexport models`)."
FIDELITY = click.Choice(["high", "medium", "low"])


class UserError(click.ClickException):
    """One line `Error: <message>`, exit status 2 (the shell's usage-error code)."""

    exit_code = 2


def clear_errors(command: Callable) -> Callable:
    """Bad input ends with `Error: <what and how to fix it>` and exit status 2, not a traceback; Ctrl-C says how
    to resume."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SaexportError as e:
            raise UserError(str(e)) from None
        except OSError as e:  # ENOSPC, EACCES, ENOTDIR, ... while writing: the file and the fix, in one line
            from saexport.folders import os_error_message

            raise UserError(os_error_message(e, action="read or write")) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted — rerun the same command to resume", err=True)
            raise SystemExit(130) from None

    return wrapper


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


def overwrite_option(command: Callable) -> Callable:
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing output that saexport did not write (or that was edited since).")(
        command)


def model_options(command: Callable) -> Callable:
    command = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                           type=click.Choice(list(PRESETS)), help="Architecture preset.")(command)
    command = click.option("--weights", type=click.Path(path_type=Path),
                           help="Checkpoint folder (diffusers or original Wan layout); wan2.1-demo's ships with "
                                "saexport.")(command)
    command = click.option("--random-weights", is_flag=True,
                           help="Random weights, for benchmarks only (marked in every artifact).")(command)
    return click.option("--seed", default=0, show_default=True, help="Seed of --random-weights.")(command)


def model_source(model: str, weights: Path | None, random_weights: bool, seed: int):
    from saexport.pipeline import ModelSource

    if random_weights and weights is not None:
        raise SaexportError("give either --weights or --random-weights, not both")
    return ModelSource(model, weights, random_weights, seed)


def video_options(command: Callable) -> Callable:
    command = click.option("--resolution", help=f"480p, 720p or WIDTHxHEIGHT. {PRESET_DEFAULT}")(command)
    return click.option("--frames", type=int, help=f"Video frames (4k+1 with Wan's VAE). {PRESET_DEFAULT}")(command)


def block_options(command: Callable) -> Callable:
    command = click.option("--block-size", type=int, help=f"Attention block size. {PRESET_DEFAULT}")(command)
    return click.option("--layout", help=f"identity, tile3d or tile3d:FxHxW. {PRESET_DEFAULT}")(command)


def dtype_option(command: Callable) -> Callable:
    return click.option("--dtype", "dtype_name", type=click.Choice(DTYPE_NAMES),
                        help=f"Precision. {PRESET_DEFAULT}")(command)


def calibration_options(command: Callable) -> Callable:
    command = click.option("--prompts", default=4, show_default=True, type=click.IntRange(min=1),
                           help="Calibration prompts (built-in prompts through the checkpoint's text encoder; "
                                "synthetic without one).")(command)
    command = click.option("--calib-embeddings", type=click.Path(path_type=Path),
                           help="safetensors: `embeddings` [prompts, text_len, text_dim] (e.g. UMT5 output).")(command)
    command = click.option("--seeds", default="0", show_default=True, help="Comma-separated latent seeds.")(command)
    command = click.option("--steps", type=click.IntRange(min=1),
                           help=f"Sampler steps of the loop. {PRESET_DEFAULT}")(command)
    command = click.option("--rows-per-block", default=16, show_default=True, type=click.IntRange(min=1),
                           help="Query rows sampled per block.")(command)
    command = click.option("--calib-guidance", default=5.0, show_default=True,
                           help="Guidance scale of the calibration loop (generation's; 1 runs one pass).")(command)
    command = click.option("--calib-passes", default="cond,uncond", show_default=True,
                           help="Which passes of a guided step the probes measure.")(command)
    command = click.option("--aggregation", default="min", show_default=True,
                           type=click.Choice(["min", "prompt-min-of-step-mean", "quantile", "mean-score"]),
                           help="How WEST combines its calibration runs into one map.")(command)
    return click.option("--device", default="auto", show_default=True,
                        help="Calibration device: cuda, cpu, or auto (cuda where there is one).")(command)


def calibration(prompts: int, calib_embeddings: Path | None, seeds: str, rows_per_block: int, calib_guidance: float,
                calib_passes: str, aggregation: str, device: str):
    from saexport.pipeline import Calibration

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Calibration(prompts, calib_embeddings, tuple(int_list(seeds)), rows_per_block, calib_guidance,
                       tuple(p.strip() for p in calib_passes.split(",") if p.strip()), device, aggregation)


def budget_rule_options(command: Callable) -> Callable:
    command = click.option("--rule", default="v2", show_default=True, type=click.Choice(["v1", "v2"]),
                           help="FAST's allocation: v2 w*Q - lambda*density with end-to-end sensitivity weights; "
                                "v1 graded fidelity targets (cheaper to calibrate, 3-4 dB worse).")(command)
    command = click.option("--proxy", default="output", show_default=True,
                           type=click.Choice(["hellinger", "output", "residual"]),
                           help="v2's quality proxy: Hellinger fidelity, attention-output error, or the gated "
                                "residual update's error.")(command)
    command = click.option("--warmup", default="0", show_default=True,
                           help="v2: dense warm-up steps counted inside the density goal, or auto.")(command)
    command = click.option("--rows-per-head", default=16, show_default=True, type=click.IntRange(min=1),
                           help="v2: query rows sampled per head for the proxy.")(command)
    command = click.option("--sensitivity-prompts", default=1, show_default=True, type=click.IntRange(min=1),
                           help="v2: calibration prompts the sensitivity is measured on (each costs 1 + 5 + "
                                "layers whole generations).")(command)
    return click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
                        help="v2: weight steps and layers by their measured end-to-end sensitivity.")(command)


V2_OPTIONS = {"proxy": "--proxy", "warmup": "--warmup", "rows_per_head": "--rows-per-head",
              "sensitivity": "--sensitivity/--no-sensitivity", "sensitivity_prompts": "--sensitivity-prompts"}


def budget_rule(rule: str, proxy: str, warmup: str, rows_per_head: int, sensitivity: bool,
                sensitivity_prompts: int = 1):
    from saexport.pipeline import BudgetRule

    if rule == "v1":  # v1 reads none of v2's settings: one given is a mistake, not a no-op
        context = click.get_current_context(silent=True)
        given = [flag for name, flag in V2_OPTIONS.items() if context is not None
                 and context.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
        if given:
            raise SaexportError(f"{', '.join(given)} applies to --rule v2 only (FAST v1 ignores it)")
    if warmup != "auto":
        try:
            warmup = int(warmup)
        except ValueError:
            raise SaexportError(f"--warmup must be a number of steps or auto, got '{warmup}'") from None
    return BudgetRule(rule, proxy, warmup, rows_per_head, sensitivity, sensitivity_prompts=sensitivity_prompts)


def int_list(text: str, option: str = "--seeds") -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SaexportError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values:
        raise SaexportError(f"{option} needs at least one integer")
    return values
