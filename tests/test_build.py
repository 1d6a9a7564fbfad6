"""`saexport build`: stages rerun only when their inputs change, and an interrupted build resumes."""

import json

import pytest

import saexport.exporter.onnx_export as onnx_export
from saexport.build import BuildSettings, run_build
from saexport.errors import SaexportError
from saexport.topology.files import Budgets


def settings(**changes) -> BuildSettings:
    base = dict(model="wan2.1-tiny", random_weights=True, resolution="64x64", frames=9, block_size=8,
                layout="tile3d:1x2x4", steps=3, rows_per_block=4, prompts=2, dtype="fp32", fidelity="medium")
    return BuildSettings(**{**base, **changes})


def ran(fates: dict[str, str]) -> list[str]:
    return [stage for stage, fate in fates.items() if fate == "ran"]


def test_rerun_does_nothing_and_a_change_reruns_only_what_depends_on_it(tmp_path):
    first = run_build(settings(), tmp_path, echo=lambda _: None)
    assert ran(first) == ["topology", "budgets", "export", "triton"]
    assert first["engine"].startswith("skipped: TensorRT is not installed")
    assert (tmp_path / "triton" / "wan_pipeline" / "config.pbtxt").exists()
    assert ran(run_build(settings(), tmp_path, echo=lambda _: None)) == []
    assert Budgets.load(tmp_path / "budgets.safetensors").fidelity == "medium"
    again = run_build(settings(fidelity="high"), tmp_path, echo=lambda _: None)
    assert ran(again) == ["budgets", "export", "triton"] and again["topology"] == "current"
    assert Budgets.load(tmp_path / "budgets.safetensors").fidelity == "high"
    assert ran(run_build(settings(fidelity="high", triton_name="other"), tmp_path, echo=lambda _: None)) == ["triton"]


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
