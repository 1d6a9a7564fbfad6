import onnx
from click.testing import CliRunner

from saexport.artifacts import FidelityReport
from saexport.cli import main

TINY = ["--model", "wan2.1-tiny", "--random-weights"]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_export_verify_end_to_end(tmp_path):
    result = run("export", *TINY, "--resolution", "64x48", "--frames", "9", "--dtype", "fp32",
                 "--block-size", "16", "--steps", "4", "--verify", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output and "STAND-IN" in result.output
    errors = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "relative error" in line]
    assert len(errors) == 1 and max(errors) < 1e-4
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    assert (tmp_path / "topology.safetensors").exists() and (tmp_path / "budgets.safetensors").exists()


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    result = run("export", "--weights", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "Error: weights path" in result.output and "does not exist" in result.output
    result = run("export", *TINY, "--frames", "80", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--frames must be 4k+1" in result.output


def test_models_lists_presets():
    from saexport.models.presets import PRESETS

    lines = run("models").output.splitlines()
    for preset in PRESETS.values():  # each preset's own line, with its architecture from its config
        line = next(line for line in lines if line.split()[:1] == [preset.name])
        c = preset.config
        assert f"{c['num_layers']:3d} layers {c['num_attention_heads']:3d} heads x {c['attention_head_dim']}" in line


def test_topology_budgets_export_chain(tmp_path):
    common = [*TINY, "--steps", "4", "--prompts", "2", "--device", "cpu"]
    result = run("topology", *common, "--rows-per-block", "4", "--resolution", "64x64", "--frames", "9", "--block-size",
                 "8",
                 "--layout", "tile3d:1x2x4", "--out", str(tmp_path / "topology.safetensors"))
    assert result.exit_code == 0, result.output
    result = run("budgets", *common, "--seeds", "1", "--density", "0.3", "--topology",
                 str(tmp_path / "topology.safetensors"), "--out", str(tmp_path / "budgets.safetensors"))
    assert result.exit_code == 0, result.output
    assert "rule v2" in result.output  # the default
    assert abs(float(result.output.rsplit("mean density ", 1)[1].split()[0]) - 0.3) <= 0.01
    files = ["--topology", str(tmp_path / "topology.safetensors"), "--budgets", str(tmp_path / "budgets.safetensors")]
    result = run("export", *TINY, "--resolution", "64x64", "--frames", "9",
                 "--dtype", "fp32", *files, "--verify", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    errors = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "relative error" in line]
    assert len(errors) == 1 and max(errors) < 1e-4
    result = run("export", *TINY, "--resolution", "64x48", "--frames", "9",
                 *files, "--out", str(tmp_path / "other"))
    assert result.exit_code == 2 and "token grid" in result.output


def test_inspect_draws_pictures_and_measures_stability(tmp_path):
    common = [*TINY, "--resolution", "64x64", "--frames", "9", "--block-size", "8", "--layout",
              "tile3d:1x2x4", "--steps", "3", "--rows-per-block", "4", "--prompts", "2", "--dtype", "fp32"]
    assert run("build", *common, "--density", "0.3", "--out", str(tmp_path / "a")).exit_code == 0
    a = tmp_path / "a"
    result = run("inspect", "--topology", str(a / "topology.safetensors"), "--budgets", str(a / "budgets.safetensors"),
                 "--compare", str(a / "topology.safetensors"), "--step", "2", "--out", str(tmp_path / "pictures"))
    assert result.exit_code == 0, result.output
    for name in ("masks.png", "density.png", "fidelity.png", "quality.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "IoU of 30%-density masks" in result.output and result.output.strip().endswith("1.000")
    report = FidelityReport.read(a / "fidelity.json")  # the build's report, shown by inspect
    assert f"fidelity report: {report.summary()}" in result.output
    assert report.goal == "density 0.3" and abs(report.mean_density - 0.3) <= 0.01
    assert report.held_out["psnr"]["n"] == 2 and report.search is None and report.speedup["attention"] > 2
    result = run("inspect", "--topology", str(a / "topology.safetensors"), "--budgets", str(a / "budgets.safetensors"),
                 "--step", "3", "--out", str(tmp_path / "pictures"))
    assert result.exit_code == 2 and "--step must be in [0, 3)" in result.output


def test_verify_compares_on_polygraphy_and_fails_on_a_corrupted_graph(tmp_path):
    import json

    import numpy as np
    from onnx import numpy_helper

    out = tmp_path / "out"
    assert run("export", *TINY, "--resolution", "64x64", "--frames", "9", "--block-size", "8", "--steps", "3",
               "--dtype", "fp32", "--out", str(out)).exit_code == 0
    result = run("verify", *TINY, "--artifacts", str(out), "--save", str(tmp_path / "check"))
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs torch: max relative error" in result.output
    saved = json.loads((tmp_path / "check" / "outputs.json").read_text())
    assert saved  # polygraphy's RunResults JSON, loadable by `polygraphy run --load-outputs`
    model = onnx.load(str(out / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims) if t.data_type == onnx.TensorProto.FLOAT
                 else 0)
    array = numpy_helper.to_array(weight) * 1.5  # a deliberately corrupted weight
    weight.CopyFrom(numpy_helper.from_array(array.astype(np.float32), weight.name))
    onnx.save(model, str(out / "model.onnx"))
    result = run("verify", *TINY, "--artifacts", str(out))
    assert result.exit_code == 2 and "disagrees with PyTorch" in result.output


def test_verify_checks_a_half_precision_graph_by_its_relative_error_and_says_where_it_cannot_run(tmp_path):
    """An fp16 graph verified on the CPU provider (--device cpu) through the half-precision comparison, which a
    corrupted weight fails; a bf16 graph (the CUDA provider's) on a machine without onnxruntime-gpu is one line before
    any model loads, as is an fp32 graph asked onto cuda."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    for dtype in ("fp16", "bf16"):
        assert run("export", *TINY, "--resolution", "64x64", "--frames", "9", "--block-size", "8", "--steps", "2",
                   "--dtype", dtype, "--out", str(tmp_path / dtype)).exit_code == 0
    result = run("verify", *TINY, "--artifacts", str(tmp_path / "fp16"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    error = float(result.output.split("max relative error")[1].split()[0])
    assert 0 < error < 5e-3
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims) if t.data_type == onnx.TensorProto.FLOAT16
                 else 0)
    weight.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(weight) * 1.1).astype(np.float16), weight.name))
    onnx.save(model, str(tmp_path / "fp16" / "model.onnx"))
    result = run("verify", *TINY, "--artifacts", str(tmp_path / "fp16"), "--device", "cpu")
    assert result.exit_code == 2 and "disagrees with PyTorch" in result.output
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return  # the GPU machine runs these (tests/test_ort_ops.py)
    result = run("verify", *TINY, "--artifacts", str(tmp_path / "bf16"))
    assert result.exit_code == 2
    assert ("has no CUDA execution provider: install onnxruntime-gpu" in result.output
            or "this torch has no CUDA device" in result.output), result.output
    result = run("generate", *TINY, "--artifacts", str(tmp_path / "bf16"), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "v.safetensors"))
    assert result.exit_code == 2 and "CUDA execution provider" in result.output, result.output
    assert not (tmp_path / "v.safetensors").exists()
    result = run("generate", *TINY, "--artifacts", str(tmp_path / "fp16"), "--backend", "tensorrt", "--device", "cpu",
                 "--out", str(tmp_path / "v.safetensors"))
    assert result.exit_code == 2 and "--device is for --backend torch and onnxruntime" in result.output


def test_budgets_v2_and_the_west_aggregation_from_the_command_line(tmp_path):
    from saexport.artifacts import Budgets, Topology

    common = [*TINY, "--steps", "4", "--prompts", "2", "--device", "cpu"]
    result = run("topology", *common, "--rows-per-block", "4", "--resolution", "64x64", "--frames", "9", "--block-size",
                 "8",
                 "--aggregation", "mean-score", "--out", str(tmp_path / "t.safetensors"))
    assert result.exit_code == 0, result.output
    assert Topology.load(tmp_path / "t.safetensors").calibration["aggregation"] == "mean-score"
    result = run("budgets", *common, "--topology", str(tmp_path / "t.safetensors"), "--density", "0.45",
                 "--rule", "v2", "--proxy", "output", "--warmup", "1", "--rows-per-head", "4", "--no-sensitivity",
                 "--out", str(tmp_path / "b.safetensors"))
    assert result.exit_code == 0, result.output
    budgets = Budgets.load(tmp_path / "b.safetensors")
    assert budgets.curve["rule"] == "v2" and budgets.curve["proxy"] == "output"
    assert (budgets.levels[0] == 255).all() and abs(budgets.mean_density - 0.45) <= 0.01  # warm-up counted
    assert run("budgets", *common, "--topology", str(tmp_path / "t.safetensors"), "--warmup", "some",
               "--rule", "v2", "--out", str(tmp_path / "c.safetensors")).exit_code == 2
