"""`saexport`: one module per command group; commands are imported when asked for, so `--help` is instant.

Every command prints progress through `logging.getLogger("saexport")` (`-v` for more, `-q` for warnings only)
and ends a user's error as one line `Error: <what and how to fix it>` with exit status 2, not a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

# command -> (module, function): imported when the command runs or its help is shown.
COMMANDS = {
    "models": ("saexport.cli.info", "models"),
    "topology": ("saexport.cli.calibrate", "topology"),
    "transfer": ("saexport.cli.calibrate", "transfer"),
    "budgets": ("saexport.cli.calibrate", "budgets"),
    "inspect": ("saexport.cli.calibrate", "inspect"),
    "export": ("saexport.cli.export", "export"),
    "engine": ("saexport.cli.export", "engine"),
    "triton": ("saexport.cli.export", "triton"),
    "verify": ("saexport.cli.export", "verify"),
    "build": ("saexport.cli.build", "build"),
    "generate": ("saexport.cli.generate", "generate"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup)
@click.version_option(package_name="saexport")
@click.option("-v", "--verbose", count=True, help="More detail (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """Export Wan2.1 with ScalingAttention block-sparse attention to ONNX, TensorRT and Triton."""
    log = logging.getLogger("saexport")
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun rank 0 reports and warns for all (every rank runs alike)
        level = logging.ERROR
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    click.get_current_context().call_on_close(_leave_ranks)


def _leave_ranks() -> None:
    """A command run under torchrun leaves its process group before the process exits: gloo's and NCCL's threads
    torn down by the interpreter's exit instead can abort a rank that has finished its work (SIGABRT,
    "terminate called without an active exception"). torch is not imported here unless the command did."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


class _StderrHandler(logging.StreamHandler):
    """`[saexport] message` to whatever sys.stderr is when the record is emitted (a test runner may swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("[saexport] %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass
