"""Nothing of a user's is overwritten: each way the issue "Nothing lost, nothing silent, round two" found to lose
a file, run as a real `saexport` process. The refusal is one line, exit 2, before any compute, and the user's
bytes are unchanged; `--overwrite` (or a file saexport itself wrote) lets the command replace it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saexport.artifacts import ArtifactFolder
from saexport.pipeline import BuildSettings, Calibration, ModelSource, resolve_run, run_build
from saexport.topology.goals import BudgetRule, Goal

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "saexport" / "demo" / "weights"


def saexport(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saexport", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1, done.stderr
    for fragment in fragments:
        assert fragment in error[0], error[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> ArtifactFolder:
    """The demo model's fp32 build, small (16 x 16 x 2 frames, 2 steps): topology, budgets, model.onnx, Triton."""
    out = tmp_path_factory.mktemp("demo_build")
    settings = BuildSettings(source=ModelSource("wan2.1-demo"),
                             run=resolve_run("wan2.1-demo", resolution="16x16", frames=2, block_size=16,
                                             layout="tile3d:1x4x4", steps=2, dtype="fp32"),
                             calibration=Calibration(prompts=1, rows_per_block=2, guidance=1.0, steps=2),
                             goal=Goal.of_density(0.2), budget_rule=BudgetRule(rule="v1"))
    run_build(settings, out, echo=lambda _: None)
    return ArtifactFolder(out)


def test_generate_keeps_a_users_video_and_replaces_its_own(demo_build, tmp_path):
    holiday = tmp_path / "myvideos" / "holiday.gif"
    holiday.parent.mkdir()
    holiday.write_bytes(b"GIF89a my holiday")
    args = ["generate", "--artifacts", demo_build.root, "--prompt", "a red circle moving right on blue stripes"]
    assert_refused(saexport(*args, "--out", holiday), str(holiday), "--overwrite")
    assert holiday.read_bytes() == b"GIF89a my holiday"

    own = tmp_path / "own.gif"
    assert saexport(*args, "--out", own).returncode == 0
    first = own.read_bytes()
    done = saexport(*args, "--seed", "1", "--out", own)  # a rerun replaces what generate wrote
    assert done.returncode == 0, done.stderr
    assert own.read_bytes() != first

    done = saexport(*args, "--out", holiday, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert holiday.read_bytes()[:6] == b"GIF89a" and holiday.stat().st_size > 100


def test_topology_never_writes_into_its_input_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO_WEIGHTS, ckpt)
    before = snapshot(ckpt)
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    for overwrite in ([], ["--overwrite"]):
        done = saexport("topology", "--weights", ckpt, "--prompts", "1", "--steps", "2", "--out", weights, *overwrite)
        assert_refused(done, str(weights), "inside the input")
    assert snapshot(ckpt) == before


def test_topology_keeps_a_users_safetensors_unless_overwrite(demo_build, tmp_path):
    mine = tmp_path / "mine.safetensors"
    shutil.copy(DEMO_WEIGHTS / "transformer" / "diffusion_pytorch_model.safetensors", mine)
    before = mine.read_bytes()
    done = saexport("transfer", "--topology", demo_build.topology, "--resolution", "16x16", "--frames", "4",
                    "--out", mine)
    assert_refused(done, str(mine), "did not write it")
    assert mine.read_bytes() == before
    ours = tmp_path / "t.safetensors"
    shutil.copy(demo_build.topology, ours)  # a topology file saexport wrote: a rerun replaces it
    done = saexport("transfer", "--topology", demo_build.topology, "--resolution", "16x16", "--frames", "4",
                    "--out", ours)
    assert done.returncode == 0, done.stderr


def test_export_does_not_take_over_a_folder_of_the_users_own_onnx(tmp_path):
    mine = tmp_path / "my_onnx"
    mine.mkdir()
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "mine",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(mine / "model.onnx"))
    (mine / "model.onnx.data").write_bytes(b"my weights")
    before = snapshot(mine)
    done = saexport("export", "--steps", "2", "--out", mine)
    assert_refused(done, str(mine), "did not mark as its own")
    assert snapshot(mine) == before


def test_triton_rerun_keeps_a_hand_edited_config_unless_overwrite(demo_build, tmp_path):
    repo = tmp_path / "repo"
    args = ["triton", "--onnx", demo_build.onnx, "--out", repo]
    assert saexport(*args).returncode == 0
    config = repo / "wan_dit" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 0", "max_batch_size: 0  # tuned"))
    assert "# tuned" in config.read_text()
    before = snapshot(repo)
    assert_refused(saexport(*args), "wan_dit/config.pbtxt", "changed since saexport wrote it", "--overwrite")
    assert snapshot(repo) == before
    done = saexport(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "# tuned" not in config.read_text()
