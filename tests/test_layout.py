"""The package's layout is its pipeline (docs/ARCHITECTURE.md, "Layout of the repository"): imports only go down it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "saexport"
# Lower rank = lower in the pipeline; a module may import its own package and anything of lower rank. Equal ranks
# are siblings that never import each other (artifacts and models: DESIGN.md's "artifacts, models" layer).
RANK = {"errors": 0, "atomic": 1, "folders": 1, "layout": 1, "levels": 1, "kernels": 1, "artifacts": 2,
        "models": 2, "runtime": 3, "demo": 3, "topology": 4, "exporter": 5, "engines": 6,
        "triton": 7, "pipeline": 8, "cli": 9, "__main__": 10}


def imports_of(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "saexport":
            found.extend(f"saexport.{alias.name}" for alias in node.names)  # from saexport import x
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("saexport.")]


def test_every_module_is_placed_in_the_layout():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops <= set(RANK), f"modules the layout does not place: {sorted(tops - set(RANK))}"


def test_imports_only_go_down_the_pipeline():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        me = parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        for name in imports_of(path):
            target = name.split(".")[1]
            if target != me and RANK[target] >= RANK[me]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if me == "models" and target == "demo":  # beside runtime, but models never needs the demo
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, "\n".join(upward)


def test_runtime_parallel_sits_below_the_rest_of_runtime():
    """runtime/parallel/ is below the rest of runtime (docs/ARCHITECTURE.md): generation opens its back ends on the
    rank groups and heads' split parallel/ makes, and parallel/ never reaches back up into runtime."""
    upward = [f"{path.relative_to(PACKAGE)} imports {name}"
              for path in sorted((PACKAGE / "runtime" / "parallel").rglob("*.py"))
              for name in imports_of(path)
              if name.startswith("saexport.runtime.") and not name.startswith("saexport.runtime.parallel")]
    assert not upward, "\n".join(upward)
