"""`saexport build`: stages rerun only when their inputs change, an interrupted build resumes, and a build writes
the same bytes as the single-stage commands."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import saexport.exporter.onnx_export as onnx_export
from saexport.artifacts import ArtifactFolder, Budgets
from saexport.cli import main
from saexport.errors import SaexportError
from saexport.pipeline import BuildSettings, Calibration, ModelSource, Serving, resolve_run, run_build
from saexport.topology.goals import DENSITY_GOALS, Goal

TINY = dict(resolution="64x64", frames=9, block_size=8, layout="tile3d:1x2x4", steps=3, dtype="fp32")
CALIBRATION = Calibration(prompts=2, rows_per_block=4, steps=3)


def settings(fidelity="medium", **changes) -> BuildSettings:
    """A tiny build whose budgets are for the density the preset once named (a quality search on random weights
    would measure noise)."""
    return BuildSettings(source=ModelSource("wan2.1-tiny", random_weights=True), run=resolve_run("wan2.1-tiny", **TINY),
                         calibration=CALIBRATION, goal=Goal(fidelity, density=DENSITY_GOALS[fidelity]), **changes)


def ran(fates: dict[str, str]) -> list[str]:
    return [stage for stage, fate in fates.items() if fate == "ran"]


def test_rerun_does_nothing_and_a_change_reruns_only_what_depends_on_it(tmp_path):
    first = run_build(settings(), tmp_path, echo=lambda _: None)
    assert ran(first) == ["topology", "budgets", "export", "triton"]
    assert first["engine"].startswith("skipped: TensorRT is not installed")
    assert (tmp_path / "triton" / "wan_pipeline" / "config.pbtxt").exists()
    assert ran(run_build(settings(), tmp_path, echo=lambda _: None)) == []
    assert Budgets.load(tmp_path / "budgets.safetensors").fidelity == "medium"
    again = run_build(settings("high"), tmp_path, echo=lambda _: None)
    assert ran(again) == ["budgets", "export", "triton"] and again["topology"] == "current"
    assert Budgets.load(tmp_path / "budgets.safetensors").fidelity == "high"
    assert ran(run_build(settings("high", serving=Serving("other")), tmp_path, echo=lambda _: None)) == ["triton"]
    guidance = replace(settings("high"), calibration=replace(CALIBRATION, passes=("cond",)))
    assert ran(run_build(guidance, tmp_path, echo=lambda _: None)) == ["topology", "budgets", "export", "triton"]


def test_an_interrupted_build_resumes_from_its_first_unfinished_stage(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_build(settings(), tmp_path, echo=lambda _: None)
    assert list(json.loads((tmp_path / "build.json").read_text())["stages"]) == ["topology", "budgets"]
    assert not (tmp_path / "model.onnx").exists()
    monkeypatch.undo()
    assert ran(run_build(settings(), tmp_path, echo=lambda _: None)) == ["export", "triton"]


def test_a_deleted_output_is_rebuilt_and_a_corrupt_manifest_is_named(tmp_path):
    run_build(settings(), tmp_path, echo=lambda _: None)
    (tmp_path / "model.onnx").unlink()
    # The same inputs give the same graph, so the Triton repository (its own copy) stays current.
    assert ran(run_build(settings(), tmp_path, echo=lambda _: None)) == ["export"]
    (tmp_path / "build.json").write_text("{not json")
    with pytest.raises(SaexportError, match="build.json is corrupt"):
        run_build(settings(), tmp_path, echo=lambda _: None)


def test_build_writes_the_same_bytes_as_the_single_stage_commands(tmp_path):
    """One set of stage functions: `build` is `topology` + `budgets` + `export`, byte for byte."""
    options = ["--model", "wan2.1-tiny", "--random-weights", "--steps", "3", "--prompts", "2", "--seeds", "0,5",
               "--device", "cpu"]
    west = ["--rows-per-block", "4"]  # WEST's: FAST v2 samples its own rows
    grid = ["--resolution", "64x64", "--frames", "9", "--block-size", "8", "--layout", "tile3d:1x2x4"]
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output

    built, staged = ArtifactFolder(tmp_path / "built"), ArtifactFolder(tmp_path / "staged")
    run("build", *options, *west, *grid, "--dtype", "fp32", "--density", "0.2", "--out", str(built.root))
    run("topology", *options, *west, *grid, "--out", str(staged.topology))
    run("budgets", *options, "--topology", str(staged.topology), "--density", "0.2", "--out", str(staged.budgets))
    run("export", "--model", "wan2.1-tiny", "--random-weights", "--resolution", "64x64", "--frames", "9",
        "--dtype", "fp32", "--topology", str(staged.topology), "--budgets", str(staged.budgets),
        "--out", str(staged.root))
    for name in ("topology", "budgets", "onnx"):
        assert getattr(built, name).read_bytes() == getattr(staged, name).read_bytes(), name


def test_generate_reads_every_folder_build_and_export_write(tmp_path):
    """Each back end finds its files where `artifacts.ArtifactFolder` says, in a build and in an export folder."""
    runner = CliRunner()
    build_dir, export_dir = tmp_path / "build", tmp_path / "export"
    run_build(settings(), build_dir, echo=lambda _: None)
    result = runner.invoke(main, ["export", "--model", "wan2.1-tiny", "--random-weights", "--resolution", "64x64",
                                  "--frames", "9", "--dtype", "fp32",
                                  "--topology", str(build_dir / "topology.safetensors"),
                                  "--budgets", str(build_dir / "budgets.safetensors"), "--out", str(export_dir)])
    assert result.exit_code == 0, result.output
    for folder in (build_dir, export_dir):
        for backend in ("torch", "onnxruntime"):
            out = folder / f"{backend}.safetensors"
            result = runner.invoke(main, ["generate", "--random-weights", "--artifacts", str(folder), "--backend",
                                          backend, "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert out.is_file()
        # TensorRT: up to the point TensorRT itself is needed, the engine is looked for where the engine stage writes
        result = runner.invoke(main, ["generate", "--random-weights", "--artifacts", str(folder), "--backend",
                                      "tensorrt", "--plugin", str(tmp_path / "plugin.so"), "--out", str(out)])
        assert result.exit_code == 2 and "TensorRT is not installed" in result.output
