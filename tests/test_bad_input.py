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
from saexport.topology.goals import Goal

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
                             calibration=Calibration(prompts=1, rows_per_block=4, guidance=1.0, steps=3),
                             goal=Goal.of_density(0.2))
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
    assert_user_error(result, "bf16 graph", "engine (--engine)", "export it in fp32")
    assert not (tmp_path / "repo").exists()


def test_step_counts_come_from_the_budgets(built, tmp_path):
    assert_user_error(run("triton", "--onnx", built.onnx, "--steps", "7", "--out", tmp_path / "r"), "--steps")
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--steps", "0", "--out",
                          tmp_path / "x.safetensors"), "--steps")
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, "--steps", "7", "--out",
                          tmp_path / "x.safetensors"), "budgets are for 3 steps")


@pytest.mark.parametrize("option", [["--proxy", "residual"], ["--warmup", "2"], ["--rows-per-head", "4"],
                                    ["--no-sensitivity"]])
def test_a_v2_option_with_rule_v1_is_an_error_not_a_no_op(built, tmp_path, option):
    out = tmp_path / "b.safetensors"
    assert_user_error(run("budgets", *TINY, "--topology", built.topology, "--steps", "3", "--rule", "v1", *option,
                          "--out", out), option[0], "no effect with --rule v1")
    assert not out.exists()


def test_budgets_refuses_the_options_only_west_or_v1_read(built, tmp_path):
    out = tmp_path / "b.safetensors"
    budgets = ["budgets", *TINY, "--topology", built.topology, "--steps", "3", "--out", out]
    assert_user_error(run(*budgets, "--rows-per-block", "8"), "--rows-per-block has no effect with --rule v2")
    result = run(*budgets, "--aggregation", "quantile")  # WEST's: not an option of budgets at all
    assert result.exit_code == 2 and "No such option '--aggregation'" in result.output
    assert not out.exists()


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


def snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_triton_never_destroys_a_build_folder_or_the_current_folder(built, tmp_path, monkeypatch):
    (built.root / "my notes.txt").write_text("keep me")
    before = snapshot(built.root)
    result = run("triton", "--onnx", built.onnx, "--out", built.root)
    assert_user_error(result, str(built.root))
    assert snapshot(built.root) == before
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(workdir)
    assert_user_error(run("triton", "--onnx", built.onnx, "--out", "."), "current folder")
    assert (workdir / "thesis.tex").read_text() == "years of work" and len(list(workdir.iterdir())) == 1
    (built.root / "my notes.txt").unlink()


def test_a_triton_repository_is_replaced_whole_and_readable_by_others(built, tmp_path):
    repo = tmp_path / "repo"
    assert run("triton", "--onnx", built.onnx, "--out", repo).exit_code == 0
    assert repo.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    first = snapshot(repo)
    assert run("triton", "--onnx", built.onnx, "--name", "other", "--out", repo).exit_code == 0
    assert (repo / "other_dit").is_dir() and not (repo / "wan_dit").exists()  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left beside it
    (repo / "extra.txt").write_text("a user's file")
    assert_user_error(run("triton", "--onnx", built.onnx, "--out", repo), "extra.txt")
    assert (repo / "extra.txt").exists() and first != snapshot(repo)


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_build_on_a_locked_folder_refuses_naming_the_first(tmp_path):
    """Two builds into one --out at once: the second refuses with the first's pid; the folder stays consistent."""
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom saexport.folders import FolderLock, claim_output_folder\n"
        f"lock = FolderLock(claim_output_folder({str(out)!r}, 'build'))\nlock.acquire()\n"
        "print('held', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run("build", *TINY, *GRID, "--steps", "2", "--prompts", "1", "--device", "cpu", "--dtype", "fp32",
                     "--out", out)
        assert_user_error(result, f"pid {holder.pid}", "wait for it or use another --out")
        assert not (out / "build.json").exists() and not (out / "topology.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_output_changed_since_the_build_is_rebuilt_not_trusted(built, tmp_path):
    settings = BuildSettings(source=ModelSource("wan2.1-tiny", random_weights=True),
                             run=resolve_run("wan2.1-tiny", resolution="64x64", frames=9, block_size=8,
                                             layout="tile3d:1x2x4", steps=3, dtype="fp32"),
                             calibration=Calibration(prompts=1, rows_per_block=4, guidance=1.0, steps=3),
                             goal=Goal.of_density(0.2))
    budgets = built.budgets.read_bytes()
    from saexport.artifacts import Budgets

    other = Budgets.load(built.budgets)
    other.levels[0] = 255  # another valid budgets file, written over the build's by hand
    other.save(built.budgets)
    fates = run_build(settings, built.root, echo=lambda _: None)
    assert fates["topology"] == "current" and fates["budgets"] == "ran"
    assert built.budgets.read_bytes() == budgets


def test_a_killed_exports_staging_is_cleaned_by_the_next_export(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    assert run("export", *TINY, *GRID, "--steps", "2", "--dtype", "fp32", "--out", out).exit_code == 0
    subprocess.run([sys.executable, "-c", (
        "import os, signal\nfrom saexport.folders import temporary_folder\n"
        f"with temporary_folder({str(out)!r}, '.export-') as tmp:\n"
        "    (tmp / 'model.onnx.data').write_bytes(b'x' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")])
    assert [p.name for p in out.iterdir() if p.name.startswith(".export-")]  # SIGKILL left it
    assert run("export", *TINY, *GRID, "--steps", "2", "--dtype", "fp32", "--out", out).exit_code == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".export-")]


def test_an_interrupted_calibration_says_it_resumes_and_ctrl_c_says_how(tmp_path, monkeypatch):
    import saexport.topology.calibration as calibration

    original, events = calibration.sampling_loop, []

    def interrupted(*args, **kwargs):
        for event in original(*args, **kwargs):
            events.append(event)
            if len(events) == 4:  # one trajectory (2 steps x 1 pass) done, the next begun
                raise KeyboardInterrupt
            yield event

    topology = ["topology", *TINY, *GRID, "--steps", "2", "--prompts", "2", "--calib-guidance", "1",
                "--device", "cpu", "--out", tmp_path / "t.safetensors"]
    monkeypatch.setattr(calibration, "sampling_loop", interrupted)
    result = run(*topology)
    assert result.exit_code == 130 and "interrupted — rerun the same command to resume" in result.output
    monkeypatch.undo()
    result = run(*topology)
    assert result.exit_code == 0 and "resuming: 1 of 2 calibration runs done" in result.output


def test_a_checkpoint_of_another_architecture_names_the_preset_or_says_none_matches(tmp_path):
    from saexport.models.checkpoint import load_model

    loaded = load_model("wan2.1-tiny", random_weights=True)
    loaded.transformer.save_pretrained(tmp_path / "tiny" / "transformer")
    assert_user_error(run("export", "--model", "wan2.1-small", "--weights", tmp_path / "tiny", "--out",
                          tmp_path / "a"), "Pass --model wan2.1-tiny.")
    loaded.transformer.register_to_config(ffn_dim=96)
    loaded.transformer.save_pretrained(tmp_path / "odd" / "transformer")
    assert_user_error(run("export", "--model", "wan2.1-tiny", "--weights", tmp_path / "odd", "--out", tmp_path / "b"),
                      "ffn_dim: checkpoint has 96", "It matches none of the presets saexport knows")


def test_a_corrupt_graph_and_a_full_disk_are_one_line_errors(built, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for artifact in (built.topology, built.budgets):
        (broken / artifact.name).write_bytes(artifact.read_bytes())
    (broken / "model.onnx").write_bytes(built.onnx.read_bytes()[:5000])  # truncated
    assert_user_error(run("generate", *TINY, "--artifacts", broken, "--backend", "onnxruntime", "--out",
                          tmp_path / "x.safetensors"), "is not a readable ONNX model", "model.onnx")
    # /dev/full: every write fails with ENOSPC, as on a full disk.
    result = run("generate", *TINY, "--artifacts", built.root, "--backend", "onnxruntime", "--out", "/dev/full")
    assert_user_error(result)
    assert "/dev/full" in result.output


@pytest.mark.parametrize("args, message", [
    (["--rule", "v1"], "the quality target high needs --rule v2"),
    (["--fidelity", "low", "--density", "0.3"], "give one of --fidelity, --target-psnr and --density"),
    (["--target-psnr", "99"], "--target-psnr must be within 10..60 dB, got 99"),
    (["--density", "1.5"], "--density must be in (0, 1], got 1.5"),
    (["--density", "0"], "--density must be in (0, 1], got 0"),
])
def test_a_quality_or_density_goal_is_checked_before_compute(built, tmp_path, args, message):
    out = tmp_path / "b.safetensors"
    assert_user_error(run("budgets", *TINY, "--topology", built.topology, "--steps", "3", *args, "--out", out),
                      message)
    assert not out.exists()


@pytest.mark.parametrize("args, name, message", [
    (["--seed", "99999999999999999999999"], "x.safetensors", "--seed must be within 0..2^63-1"),
    (["--guidance", "nan"], "x.safetensors", "--guidance must be a finite number, got nan"),
    (["--prompt", "a red circle", "--embeddings", "x.safetensors"], "y.safetensors",
     "give a --prompt or its --embeddings, not both"),
    (["--upscale", "5000"], "v.gif", "--upscale 5000 makes a"),
])
def test_generate_refuses_bad_requests_before_sampling(built, tmp_path, args, name, message):
    out = tmp_path / name
    assert_user_error(run("generate", *TINY, "--artifacts", built.root, *args, "--out", out), message)
    assert not out.exists()


@pytest.mark.parametrize("device, message", [("gpu", "--device must be cpu, cuda, cuda:N or auto, got 'gpu'"),
                                              ("cuda:x", "--device must be cpu, cuda")])
def test_a_device_name_is_checked_before_compute(tmp_path, device, message):
    assert_user_error(run("topology", *TINY, *GRID, "--device", device, "--out", tmp_path / "t.safetensors"), message)


def test_a_topology_of_too_few_layers_is_named(built, tmp_path):
    topology = Topology.load(built.topology)
    topology.levels = topology.levels[:1]  # a hand-edited map: one layer of the tiny model's two
    short = tmp_path / "short.safetensors"
    topology.save(short)
    result = run("export", *TINY, *GRID[:4], "--topology", short, "--budgets", built.budgets, "--out", tmp_path / "e")
    assert_user_error(result, "covers 1 layers x 4 heads, wan2.1-tiny has 2 x 4")


def test_a_manifest_stage_without_its_key_is_named(built, tmp_path):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(built.root, folder)
    manifest = json.loads((folder / "build.json").read_text())
    del manifest["stages"]["topology"]["key"]
    (folder / "build.json").write_text(json.dumps(manifest))
    result = run("build", *TINY, *GRID, "--steps", "3", "--prompts", "1", "--device", "cpu", "--dtype", "fp32",
                 "--density", "0.2", "--out", folder)
    assert_user_error(result, "build.json is corrupt or from an older saexport")


def test_embeddings_of_another_text_length_are_refused_on_every_back_end(built, tmp_path):
    short = tmp_path / "short.safetensors"
    save_file({"embeddings": torch.randn(1, 5, 32)}, str(short))  # the tiny model encodes 8 tokens
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.safetensors"
        result = run("generate", *TINY, "--artifacts", built.root, "--backend", backend, "--embeddings", short,
                     "--out", out)
        assert_user_error(result, "embeddings must be [prompts, 8, 32], got (1, 5, 32)")
        assert not out.exists()


def test_budgets_edited_beside_their_graph_are_refused(built, tmp_path):
    import shutil

    from saexport.artifacts import Budgets

    folder = tmp_path / "edited"
    shutil.copytree(built.root, folder)
    budgets = Budgets.load(folder / "budgets.safetensors")
    budgets.levels[0] = 255
    budgets.save(folder / "budgets.safetensors")  # the torch back end would read this, ONNX Runtime the graph's
    for backend in ("torch", "onnxruntime"):
        result = run("generate", *TINY, "--artifacts", folder, "--backend", backend, "--out",
                     tmp_path / "x.safetensors")
        assert_user_error(result, "its budgets.safetensors is not the budgets model.onnx froze")


def test_a_transfer_to_a_grid_too_large_for_memory_is_refused_before_compute(built, tmp_path):
    out = tmp_path / "t.safetensors"
    result = run("transfer", "--topology", built.topology, "--resolution", "2048x2048", "--frames", "81", "--out", out)
    assert_user_error(result, "transferring it needs about", "choose a smaller --resolution or --frames")
    assert not out.exists()


def test_an_mp4_without_its_writer_is_refused_before_sampling(built, tmp_path):
    try:
        import imageio_ffmpeg  # noqa: F401
        pytest.skip("imageio-ffmpeg is installed here: the MP4 writer exists")
    except ImportError:
        pass
    (tmp_path / "vae").mkdir()
    result = run("generate", *TINY, "--artifacts", built.root, "--vae", tmp_path / "vae", "--out", tmp_path / "v.mp4")
    assert_user_error(result, "writing .mp4 needs imageio-ffmpeg")
