"""Bad input gets a one-line error (exit 2) before any compute, and loses nothing: a test per row of the table in
the issue "Nothing lost, nothing silent", on the tiny and demo models."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from saexport.artifacts import ArtifactFolder, Topology
from saexport.cli import main
from saexport.pipeline import BuildSettings, Calibration, ModelSource, resolve_run, run_build

TINY = ["--model", "wan2.1-tiny", "--random-weights"]
GRID = ["--resolution", "64x64", "--frames", "9", "--block-size", "8", "--layout", "tile3d:1x2x4"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny fp32 build: topology, budgets, model.onnx, triton/."""
    out = tmp_path_factory.mktemp("built")
    settings = BuildSettings(source=ModelSource("wan2.1-tiny", random_weights=True),
                             run=resolve_run("wan2.1-tiny", resolution="64x64", frames=9, block_size=8,
                                             layout="tile3d:1x2x4", steps=3, dtype="fp32"),
                             calibration=Calibration(prompts=1, rows_per_block=4, guidance=1.0), fidelity="low")
    run_build(settings, out, echo=lambda _: None)
    return ArtifactFolder(out)


def test_non_finite_weights_are_named(tmp_path):
    """4 KB of 0xFF inside a weight tensor (NaN in fp16/bf16/fp32): an error naming the tensor, not an export."""
    state = {k: v.contiguous() for k, v in
             __import__("saexport.models.checkpoint", fromlist=["load_model"]).load_model(
                 "wan2.1-tiny", random_weights=True).transformer.state_dict().items()}
    folder = tmp_path / "ckpt" / "transformer"
    folder.mkdir(parents=True)
    config = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 4,
              "attention_head_dim": 16, "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 32,
              "ffn_dim": 128, "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
              "eps": 1e-6, "rope_max_seq_len": 1024}
    (folder / "config.json").write_text(json.dumps(config))
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8:8 + header])["blocks.1.ffn.net.0.proj.weight"]
    start = 8 + header + info["data_offsets"][0]
    data[start:start + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    result = run("export", "--model", "wan2.1-tiny", "--weights", tmp_path / "ckpt", *GRID, "--steps", "2",
                 "--out", tmp_path / "out")
    assert_user_error(result, "non-finite values", "blocks.1.ffn.net.0.proj.weight")
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("levels", [torch.zeros(2, 4, 6, dtype=torch.uint8),  # 3-D
                                    torch.zeros(2, 4, 6, 5, dtype=torch.uint8),  # not square
                                    torch.zeros(2, 4, 7, 7, dtype=torch.uint8),  # not the grid's n
                                    torch.zeros(2, 4, 6, 6, dtype=torch.int32),
                                    torch.zeros(2, 4, 6, 6, dtype=torch.float32)])
def test_a_topology_of_the_wrong_shape_or_dtype_is_refused_by_every_reader(built, tmp_path, levels):
    good = Topology.load(built.topology)
    bad = tmp_path / "bad.safetensors"
    save_file({"levels": levels}, str(bad), metadata={k: json.dumps(v) for k, v in good.metadata().items()})
    for args in (["inspect", "--topology", bad, "--budgets", built.budgets, "--out", tmp_path / "pics"],
                 ["budgets", *TINY, "--topology", bad, "--steps", "3", "--out", tmp_path / "b.safetensors"],
                 ["export", *TINY, *GRID[:4], "--topology", bad, "--budgets", built.budgets,
                  "--out", tmp_path / "export"]):
        result = run(*args)
        assert_user_error(result, str(bad))
        assert "uint8" in result.output or "[layers, heads, 6, 6]" in result.output
    assert not (tmp_path / "export").exists() or not (tmp_path / "export" / "model.onnx").exists()


def test_triton_refuses_a_bf16_graph_without_an_engine(tmp_path):
    result = run("export", *TINY, *GRID, "--steps", "2", "--dtype", "bf16", "--out", tmp_path / "bf16")
    assert result.exit_code == 0, result.output
    result = run("triton", "--onnx", tmp_path / "bf16" / "model.onnx", "--out", tmp_path / "repo")
    assert_user_error(result, "bf16 graph", "--engine", "--dtype fp32")
    assert not (tmp_path / "repo").exists()


def test_step_counts_come_from_the_budgets(built, tmp_path):
    assert_user_error(run("triton", "--onnx", built.onnx, "--steps", "7", "--out", tmp_path / "r"), "--steps")
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--steps", "0", "--out",
                          tmp_path / "x.safetensors"), "--steps")
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--steps", "7", "--out",
                          tmp_path / "x.safetensors"), "budgets are for 3 steps")


@pytest.mark.parametrize("args, message", [
    (["--block-size", "0"], "--block-size must be a positive number"),
    (["--calib-embeddings", "missing.safetensors"], "missing.safetensors does not exist"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--calib-passes", "cond,sideways"], "calibration passes must be among cond, uncond"),
])
def test_option_ranges_are_checked_before_compute(tmp_path, args, message):
    base = {"--block-size": "8", "--steps": "2"}
    options = [*TINY, "--resolution", "64x64", "--frames", "9", "--layout", "tile3d:1x2x4"]
    for name, value in base.items():
        if name not in args:
            options += [name, value]
    assert_user_error(run("topology", *options, *args, "--out", tmp_path / "t.safetensors"), message)
    assert not (tmp_path / "t.safetensors").exists()


def test_a_video_too_large_for_memory_or_rope_is_refused(tmp_path):
    result = run("topology", "--resolution", "2048x2048", "--out", tmp_path / "t.safetensors")
    assert_user_error(result, "16777216 tokens", "choose a smaller --resolution")
    # A checkpoint whose RoPE tables are shorter than the grid's longest axis.
    from saexport.models.checkpoint import load_model

    loaded = load_model("wan2.1-tiny", random_weights=True)
    loaded.transformer.register_to_config(rope_max_seq_len=2)  # the grid is 3 x 4 x 4
    loaded.transformer.save_pretrained(tmp_path / "ckpt" / "transformer")
    result = run("export", "--model", "wan2.1-tiny", "--weights", tmp_path / "ckpt", "--resolution", "64x64",
                 "--frames", "9", "--block-size", "8", "--steps", "2", "--out", tmp_path / "out")
    assert_user_error(result, "rope_max_seq_len 2")


def test_generate_checks_its_output_before_sampling(built, tmp_path):
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--out", tmp_path / "x.avi"), "'.avi'")
    (tmp_path / "file").write_text("a file")
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--out", tmp_path / "file" / "x.gif"),
                      "is a file, not a folder")
