"""The library speaks Python, the command line speaks flags: no message raised or logged below `pipeline.py` names
a command-line flag; it names the Python parameter in backticks, and the CLI shows the flag of the running command."""

import ast
import re
from pathlib import Path

import click

from saexport.cli.options import flag_names

PACKAGE = Path(__file__).resolve().parent.parent / "saexport"
FLAG = re.compile(r"(^|[\s(`\"'])--[a-z]")
CLI_LEVEL = ("cli/", "pipeline.py", "__main__.py")


def messages(tree: ast.AST):
    """String constants inside `raise` statements and logging / warnings calls."""
    for node in ast.walk(tree):
        is_log = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logging", "warnings"))
        if isinstance(node, ast.Raise) or is_log:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def test_no_library_message_names_a_flag():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(CLI_LEVEL):
            continue
        for line, text in messages(ast.parse(path.read_text())):
            if FLAG.search(text):
                found.append(f"{relative}:{line}: {text!r}")
    assert not found, "\n".join(found)


def test_the_scan_sees_a_flag_in_a_raise():
    code = 'def f():\n    raise ValueError(f"x {1} give --steps 3")\n'
    assert [text for _, text in messages(ast.parse(code)) if FLAG.search(text)] == [" give --steps 3"]


def test_the_cli_names_the_running_commands_flags():
    command = click.Command("c", params=[click.Option(["--steps"]), click.Option(["--calib-embeddings",
                                                                                    "embeddings_file"]),
                                         click.Option(["--out", "out_path"])])
    context = click.Context(command)
    message = "`steps` must be at least 1; `embeddings_file` x; pass `out` a folder; `warmup` stays"
    assert flag_names(message, context) == ("--steps must be at least 1; --calib-embeddings x; pass --out a folder; "
                                            "`warmup` stays")


def test_the_cli_offers_the_librarys_fidelity_presets():
    from saexport.cli import options
    from saexport.topology import goals

    assert options.FIDELITY_PRESETS == goals.FIDELITY_PRESETS  # the CLI's copy keeps `--help` free of torch
