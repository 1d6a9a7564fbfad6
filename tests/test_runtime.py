"""The runtime: Wan's sampler loop over the back ends, `saexport generate`, engine metadata checks."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from saexport import kernels
from saexport.artifacts import BlockedGrid, EngineMetadata, OnnxMetadata
from saexport.cli import main
from saexport.errors import SaexportError
from saexport.exporter.onnx_export import build_sparse_dit, export_onnx
from saexport.layout import parse_layout
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.denoisers import OnnxRuntimeDenoiser, TorchDenoiser, check_engine_metadata, import_tensorrt
from saexport.runtime.generation import model_identity
from saexport.runtime.sampler import SamplerSettings, sample
from saexport.topology.standin import standin_budgets, standin_topology
from tests.conftest import rel_err

VIDEO = parse_video_shape("64x64", 9)  # grid 3 x 4 x 4


@pytest.fixture
def artifacts(tiny, tmp_path):
    p = tiny.preset
    grid = VIDEO.token_grid(p.patch_size)
    topology = standin_topology(model_identity(tiny), p.num_layers, p.num_heads,
                                BlockedGrid(grid, 8, parse_layout("tile3d:1x2x4")), seed=int(torch.randint(0, 99, ())))
    budgets = standin_budgets(topology, steps=5, target_density=0.3)
    topology.save(tmp_path / "topology.safetensors")
    budgets.save(tmp_path / "budgets.safetensors")
    export_onnx(tiny, topology, budgets, VIDEO, tmp_path)
    return tiny, topology, budgets, tmp_path


def test_onnxruntime_and_torch_sample_the_same_latents(artifacts):
    tiny, topology, budgets, folder = artifacts
    text, negative = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    shape = VIDEO.latent_shape()
    seed = int(torch.randint(0, 1000, ()))
    settings = SamplerSettings(shape, 5, 3.0)
    torch_latents = sample(TorchDenoiser(build_sparse_dit(tiny, topology, budgets, VIDEO), 5), settings, text,
                           negative, seed, progress=lambda it, **_: it)
    ort_latents = sample(OnnxRuntimeDenoiser(folder / "model.onnx", 5), settings, text, negative, seed,
                         progress=lambda it, **_: it)
    assert torch_latents.shape == (1, *shape)
    assert rel_err(ort_latents, torch_latents) < 1e-3
    # guidance matters: a different scale gives different latents
    other = sample(TorchDenoiser(build_sparse_dit(tiny, topology, budgets, VIDEO), 5),
                   SamplerSettings(shape, 5, 3.0, guidance=1.0), text, negative, seed, progress=lambda it, **_: it)
    assert rel_err(other, torch_latents) > 1e-3


def test_sampler_refuses_a_step_count_the_budgets_were_not_made_for(artifacts):
    tiny, topology, budgets, _ = artifacts
    denoiser = TorchDenoiser(build_sparse_dit(tiny, topology, budgets, VIDEO), 5)
    with pytest.raises(SaexportError, match="budgets are for 5 steps"):
        sample(denoiser, SamplerSettings((16, 3, 8, 8), 50, 3.0), torch.randn(1, 8, 32), torch.randn(1, 8, 32), 0)


def test_generate_writes_latents_and_a_gif(artifacts, tmp_path):
    tiny, _, _, folder = artifacts
    embeddings = tmp_path / "prompt.safetensors"
    save_file({"embeddings": torch.randn(1, 8, 32)}, str(embeddings))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    vae.save_pretrained(tmp_path / "vae")
    runner = CliRunner()
    seed = tiny.weights_id.removeprefix("random:")
    result = runner.invoke(main, ["generate", "--random-weights", "--weights-seed", str(int(seed) + 1), "--artifacts",
                                  str(folder), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "the artifacts were made from weights random:" in result.output
    for backend in ("onnxruntime", "torch"):
        result = runner.invoke(main, ["generate", "--random-weights", "--weights-seed", seed, "--artifacts",
                                      str(folder), "--backend", backend, "--embeddings", str(embeddings),
                                      "--out", str(tmp_path / f"{backend}.safetensors")], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    a = load_file(str(tmp_path / "torch.safetensors"))["latents"]
    b = load_file(str(tmp_path / "onnxruntime.safetensors"))["latents"]
    assert a.shape == (1, 16, 3, 8, 8) and rel_err(b, a) < 1e-3
    result = runner.invoke(main, ["generate", "--random-weights", "--artifacts", str(folder), "--backend",
                                  "onnxruntime", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "v.gif")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "v.gif")
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 0


def test_engine_metadata_of_another_plugin_or_gpu_is_refused(artifacts):
    _, _, _, folder = artifacts
    engine = folder / "model.engine"
    engine.write_bytes(b"not used")
    with pytest.raises(SaexportError, match="engine.json is missing"):
        check_engine_metadata(engine)
    (folder / "engine.json").write_text("{}")
    with pytest.raises(SaexportError, match="not an engine.json of this saexport"):
        check_engine_metadata(engine)
    written = EngineMetadata(onnx=OnnxMetadata.read(folder / "model.onnx"), tensorrt_version="10.16",
                             plugin_version="1", kernel_abi=99, gpu_name="NVIDIA H100", gpu_capability=(9, 0),
                             plugin_libraries=("libsaexport_trt_plugin.so",))
    written.write(folder / "engine.json")
    assert EngineMetadata.read(folder / "engine.json") == written
    with pytest.raises(SaexportError, match=f"kernel ABI 99; this saexport has 1 / {kernels.ABI_VERSION}: rebuild it"):
        check_engine_metadata(engine)
    with pytest.raises(SaexportError, match=r"built for NVIDIA H100 \(\(9, 0\)\), this GPU is B \(\(10, 0\)\)"):
        replace(written, kernel_abi=1).check_loadable(engine, "1", 1, ("B", (10, 0)))


def test_without_tensorrt_the_engine_command_says_what_to_install(artifacts):
    try:
        import_tensorrt()
    except SaexportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: test_tensorrt_engine_matches_torch covers the engine")
    _, _, _, folder = artifacts
    result = CliRunner().invoke(main, ["engine", "--onnx", str(folder / "model.onnx"), "--plugin", "x.so",
                                       "--out", str(folder)])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output


PLUGIN = Path(__file__).resolve().parent.parent / "build" / "plugins" / "tensorrt" / "libsaexport_trt_plugin.so"


@pytest.mark.gpu
def test_tensorrt_engine_matches_torch(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA TensorRT 10.x or 11.x)")
    if not torch.cuda.is_available() or not PLUGIN.is_file():
        pytest.skip(f"needs a GPU and the plugin built at {PLUGIN} (cmake -DTensorRT_ROOT=...)")
    from saexport.engines.tensorrt_build import build_engine
    from saexport.models.checkpoint import load_model
    from saexport.runtime.denoisers import TensorRTDenoiser

    # head_dim 64 and blocks of 64: the kernel's smallest supported case, at a tiny width.
    loaded = load_model("wan2.1-small", random_weights=True, dtype=torch.bfloat16)
    video = parse_video_shape("256x256", 9)  # grid 3 x 16 x 16 = 768 tokens, 12 blocks of 64
    p = loaded.preset
    topology = standin_topology(model_identity(loaded), p.num_layers, p.num_heads,
                                BlockedGrid(video.token_grid(p.patch_size), 64, parse_layout("tile3d:1x8x8")))
    budgets = standin_budgets(topology, steps=3)
    export_onnx(loaded, topology, budgets, video, tmp_path)
    build_engine(tmp_path / "model.onnx", PLUGIN, tmp_path)
    engine = TensorRTDenoiser(tmp_path / "model.engine", PLUGIN, steps=3)
    reference = TorchDenoiser(build_sparse_dit(loaded, topology, budgets, video).cuda(), steps=3)
    inputs = (torch.randn(1, 16, 3, 32, 32), torch.tensor([500.0]), torch.randn(1, p.text_len, p.config["text_dim"]),
              torch.tensor([1], dtype=torch.int32))
    assert rel_err(engine.predict(*inputs).float(), reference.predict(*inputs).float()) < 3e-2
