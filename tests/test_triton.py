"""The Triton model repository: its configs parsed by Triton's own protobuf; each Python-backend model's work
(`saexport.triton.serving`) checked in-process against the runtime it must equal; and a real `tritonserver`
answering a prompt with the in-process runtime's frames, a bad request with an error, and the next one again."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from saexport.artifacts import ArtifactFolder, Budgets, EngineMetadata, OnnxMetadata, Topology
from saexport.errors import SaexportError
from saexport.folders import Output
from saexport.models.checkpoint import resolve_weights
from saexport.models.dit import SparseWanDiT
from saexport.models.presets import PIXELS, get_preset
from saexport.models.text_encoder import encode_prompts
from saexport.pipeline import Models, ModelSource, make_export, make_standins, resolve_run
from saexport.runtime.denoisers import OnnxRuntimeDenoiser
from saexport.runtime.sampler import SamplerSettings, sample
from saexport.runtime.video import latents_to_frames
from saexport.triton.repository import write_triton_repository
from saexport.triton.serving import Decoder, Dit, Pipeline, Spec, TextEncoder, read_config, torch_denoiser
from tests.conftest import rel_err

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] missing")
TINY = dict(resolution="64x64", frames=5, block_size=8, layout="identity", steps=3)  # latents 16 x 2 x 8 x 8
DEMO = dict(resolution="16x16", frames=2, block_size=16, layout="tile3d:1x4x4", steps=2, dtype="fp32")
PROMPT = "a red circle moving right on blue stripes"
BENCH = Path(__file__).resolve().parent.parent / "bench"


def export(source: ModelSource, out, **run) -> ArtifactFolder:
    """A stand-in topology and budgets and the ONNX freezing them, as `saexport export` writes them."""
    models = Models(source)
    settings = resolve_run(source.model, **run)
    topology, budgets = make_standins(models, settings, 0.5)
    make_export(models, settings, topology, budgets, out)
    return ArtifactFolder(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A wan2.1-tiny checkpoint in the diffusers layout with all its parts: transformer (random), UMT5 text encoder
    with a word-level tokenizer, and Wan's VAE (AutoencoderKLWan), each at test size: the one the GPU smoke test
    (bench/triton_gpu_smoke.py) serves, built by its own function."""
    spec = importlib.util.spec_from_file_location("triton_gpu_smoke", BENCH / "triton_gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    return smoke.tiny_wan_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def tiny_fp32(checkpoint, tmp_path_factory):
    return export(ModelSource("wan2.1-tiny", checkpoint), tmp_path_factory.mktemp("fp32"), dtype="fp32", **TINY)


@pytest.fixture(scope="module")
def tiny_bf16(checkpoint, tmp_path_factory):
    return export(ModelSource("wan2.1-tiny", checkpoint), tmp_path_factory.mktemp("bf16"), dtype="bf16", **TINY)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return export(ModelSource("wan2.1-demo"), tmp_path_factory.mktemp("demo"), **DEMO)


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def io(tensors):
    return [(t.name, t.data_type, list(t.dims)) for t in tensors]


def kind(config):
    return model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)


M = model_config_pb2
PROMPT_IN = [("prompt", M.TYPE_STRING, [1]), ("negative_prompt", M.TYPE_STRING, [1]), ("seed", M.TYPE_INT64, [1]),
             ("steps", M.TYPE_INT32, [1]), ("guidance_scale", M.TYPE_FP32, [1])]


# ---------------------------------------------------------------------------------------------- configs


def test_tensorrt_repository_configs(tiny_fp32, tiny_bf16, checkpoint, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"a plan would be here")
    with pytest.raises(SaexportError, match="engine.json is missing"):  # any file is not an engine
        write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "no"), "wan", engine_path=engine)
    built = EngineMetadata(OnnxMetadata.read(tiny_bf16.onnx), "10.16", "1", 2, None, None)
    built.write(tmp_path / "engine.json")
    with pytest.raises(SaexportError, match="is not an engine built from"):  # an engine of another graph
        write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "no"), "wan", engine_path=engine)
    EngineMetadata(OnnxMetadata.read(tiny_fp32.onnx), "10.16", "1", 2, None, None).write(tmp_path / "engine.json")
    assert not (tmp_path / "no").exists()
    repo = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "repo"), "wan", engine_path=engine, gpus=[0, 1],
                                   weights=checkpoint)
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
        "README.md", "wan_dit", "wan_pipeline", "wan_text_encoder", "wan_vae"]
    dit = parse(repo / "wan_dit" / "config.pbtxt")
    assert dit.platform == "tensorrt_plan" and dit.max_batch_size == 0
    assert io(dit.input) == [("hidden_states", M.TYPE_FP32, [1, 16, 2, 8, 8]), ("timestep", M.TYPE_FP32, [1]),
                             ("encoder_hidden_states", M.TYPE_FP32, [1, 8, 32]), ("step_index", M.TYPE_INT32, [1])]
    assert [(o.name, list(o.dims)) for o in dit.output] == [("noise_pred", [1, 16, 2, 8, 8])]
    assert kind(dit) == "KIND_GPU" and list(dit.instance_group[0].gpus) == [0, 1]
    assert sorted(dit.model_warmup[0].inputs) == sorted(i.name for i in dit.input)
    assert (repo / "wan_dit" / "1" / "model.plan").read_bytes() == engine.read_bytes()

    text = parse(repo / "wan_text_encoder" / "config.pbtxt")
    assert text.backend == "python" and kind(text) == "KIND_GPU" and list(text.instance_group[0].gpus) == [0, 1]
    assert io(text.input) == [("prompt", M.TYPE_STRING, [-1])]
    assert io(text.output) == [("embeddings", M.TYPE_FP32, [-1, 8, 32])]
    assert text.model_warmup[0].inputs["prompt"].zero_data
    settings = read_config(repo / "wan_text_encoder" / "1", "text_encoder.json")
    assert settings["kind"] == "umt5" and settings["dtype"] == "bf16" and settings["checkpoint"] == str(checkpoint)

    vae = parse(repo / "wan_vae" / "config.pbtxt")
    assert kind(vae) == "KIND_GPU" and vae.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert io(vae.input) == [("latents", M.TYPE_FP32, [1, 16, 2, 8, 8])]
    assert io(vae.output) == [("frames", M.TYPE_UINT8, [5, 64, 64, 3])]
    assert read_config(repo / "wan_vae" / "1", "vae.json")["vae"] == str(checkpoint / "vae")

    pipeline = parse(repo / "wan_pipeline" / "config.pbtxt")
    assert pipeline.backend == "python" and kind(pipeline) == "KIND_GPU"
    assert io(pipeline.input) == PROMPT_IN
    assert [i.name for i in pipeline.input if i.optional] == ["negative_prompt", "steps", "guidance_scale"]
    assert io(pipeline.output) == [("frames", M.TYPE_UINT8, [5, 64, 64, 3])]
    readme = (repo / "README.md").read_text()
    assert "plugins=" in readme and "LD_PRELOAD" in readme and "not copied" in readme and "wan_pipeline" in readme
    assert not list(repo.rglob("*.safetensors"))  # the checkpoint is referenced, never copied


def test_cpu_repositories_with_and_without_a_checkpoint(tiny_fp32, checkpoint, tmp_path):
    """An fp32 graph: the DiT in ONNX Runtime, everything on the CPU; without a checkpoint (no text encoder, no VAE)
    the pipeline takes embeddings and answers latents."""
    repo = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "full"), "wan", weights=checkpoint)
    parts = ("text_encoder", "dit", "vae", "pipeline")
    configs = {part: parse(repo / f"wan_{part}" / "config.pbtxt") for part in parts}
    assert {part: kind(c) for part, c in configs.items()} == dict.fromkeys(configs, "KIND_CPU")
    assert read_config(repo / "wan_dit" / "1", "dit.json")["backend"] == "onnxruntime"
    assert (repo / "wan_dit" / "1" / "model.onnx").is_file()
    assert read_config(repo / "wan_text_encoder" / "1", "text_encoder.json")["dtype"] == "fp32"

    bare = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "bare"), "wan")
    assert sorted(p.name for p in bare.iterdir() if p.is_dir()) == ["wan_dit", "wan_pipeline"]
    pipeline = parse(bare / "wan_pipeline" / "config.pbtxt")
    assert io(pipeline.input) == [("prompt_embeds", M.TYPE_FP32, [1, 8, 32]),
                                  ("negative_embeds", M.TYPE_FP32, [1, 8, 32]), *PROMPT_IN[2:]]
    assert io(pipeline.output) == [("latents", M.TYPE_FP32, [1, 16, 2, 8, 8])]


def test_a_bf16_graph_without_an_engine_serves_the_torch_dit(tiny_bf16, checkpoint, tmp_path):
    repo = write_triton_repository(tiny_bf16.onnx, Output(tmp_path / "repo"), "wan", gpus=[1], weights=checkpoint)
    dit = parse(repo / "wan_dit" / "config.pbtxt")
    assert dit.backend == "python" and kind(dit) == "KIND_GPU" and list(dit.instance_group[0].gpus) == [1]
    assert dit.input[0].data_type == M.TYPE_BF16 and dit.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    folder = repo / "wan_dit" / "1"
    settings = read_config(folder, "dit.json")
    assert settings["backend"] == "torch" and settings["dtype"] == "bf16" and settings["steps"] == 3
    assert settings["compile"] is True  # torch.compile on the GPU
    assert settings["checkpoint"] == str(checkpoint) and not (folder / "model.onnx").exists()
    meta = OnnxMetadata.read(tiny_bf16.onnx)
    assert Topology.load(ArtifactFolder(folder).topology).hash() == meta.topology_hash
    assert Budgets.load(ArtifactFolder(folder).budgets).hash() == meta.budgets_hash
    assert read_config(repo / "wan_text_encoder" / "1", "text_encoder.json")["dtype"] == "bf16"
    assert kind(parse(repo / "wan_pipeline" / "config.pbtxt")) == "KIND_GPU"
    assert "not copied" in (repo / "README.md").read_text()
    assert not list(repo.rglob("diffusion_pytorch_model*"))

    with pytest.raises(SaexportError, match="bf16 graph.*checkpoint.*`weights`.*`engine_path`.*export it in fp32"):
        write_triton_repository(tiny_bf16.onnx, Output(tmp_path / "none"), "wan")  # tiny ships no checkpoint
    assert not (tmp_path / "none").exists()


def test_a_bf16_graph_served_by_onnx_runtime_runs_on_the_gpu(tiny_bf16, tiny_fp32, checkpoint, tmp_path):
    """--dit onnxruntime on a bf16 graph: the graph itself in ONNX Runtime's CUDA provider, on the instance group's
    GPUs (no checkpoint needed for the DiT); a CPU instance of it is refused in one line; and the DiT back ends that
    cannot serve a graph are refused before anything is written."""
    from saexport.triton.serving import Dit

    repo = write_triton_repository(tiny_bf16.onnx, Output(tmp_path / "repo"), "wan", gpus=[0], weights=checkpoint,
                                   dit="onnxruntime")
    dit = parse(repo / "wan_dit" / "config.pbtxt")
    assert dit.backend == "python" and kind(dit) == "KIND_GPU" and dit.input[0].data_type == M.TYPE_BF16
    folder = repo / "wan_dit" / "1"
    assert read_config(folder, "dit.json")["backend"] == "onnxruntime"
    assert read_config(folder, "dit.json")["device"] == "cuda"
    assert (folder / "model.onnx").is_file() and not ArtifactFolder(folder).topology.exists()
    assert "CUDA execution provider" in (repo / "README.md").read_text()
    with pytest.raises(SaexportError, match="runs the graph on the GPU, and this instance is on the CPU"):
        Dit.open(folder, "cpu")

    with pytest.raises(SaexportError, match="fp32 graph: the torch DiT serves fp16/bf16"):
        write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "torch32"), "wan", dit="torch")
    with pytest.raises(SaexportError, match="the tensorrt DiT needs its engine"):
        write_triton_repository(tiny_bf16.onnx, Output(tmp_path / "trt"), "wan", dit="tensorrt")
    assert not (tmp_path / "torch32").exists() and not (tmp_path / "trt").exists()


# ---------------------------------------------------------------------------------------------- the models' work


def dit_inputs(folder: ArtifactFolder, step: int):
    meta = OnnxMetadata.read(folder.onnx)
    preset = get_preset(meta.model)
    channels = preset.config["in_channels"]
    return {"hidden_states": torch.randn(1, channels, *dit_latent_dims(meta, preset)),
            "timestep": torch.tensor([700.0]),
            "encoder_hidden_states": torch.randn(1, preset.text_len, preset.config["text_dim"]),
            "step_index": torch.tensor([step], dtype=torch.int32)}


def dit_latent_dims(meta, preset):
    pt, ph, pw = preset.patch_size
    return (meta.grid[0] * pt, meta.grid[1] * ph, meta.grid[2] * pw)


def test_the_torch_dit_matches_onnx_runtime_and_refuses_bad_requests(tiny_bf16, tiny_fp32, checkpoint, tmp_path):
    """The torch GPU model's work, run on the CPU: in fp32 it equals the fp32 graph in ONNX Runtime (same
    checkpoint, topology and budgets); in bf16 it stays close; a bad request is an error before compute."""
    repo = write_triton_repository(tiny_bf16.onnx, Output(tmp_path / "repo"), "wan", weights=checkpoint)
    folder = repo / "wan_dit" / "1"
    config = read_config(folder, "dit.json")
    fp32 = [Spec(s.name, "fp32" if s.dtype == "bf16" else s.dtype, s.dims) for s in map(Spec.from_json,
                                                                                         config["inputs"])]
    torch_fp32 = Dit(torch_denoiser(folder, {**config, "dtype": "fp32"}, torch.device("cpu")), fp32,
                     Spec("noise_pred", "fp32", tuple(config["output"]["dims"])), 3)
    onnxruntime = Dit.open(write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "ort"), "wan") / "wan_dit" / "1")
    for step in (0, 2):
        inputs = dit_inputs(tiny_fp32, step)
        want = onnxruntime(inputs)
        assert rel_err(torch_fp32(inputs), want) < 1e-4
        bf16 = Dit.open(folder, "cpu")
        assert bf16.output.dtype == "bf16"
        assert isinstance(bf16.denoiser.model, SparseWanDiT)  # "compile" applies on a GPU only
        got = bf16({k: v.bfloat16() if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()})
        assert got.dtype == torch.bfloat16 and rel_err(got.float(), want) < 0.05

    good = dit_inputs(tiny_fp32, 1)
    for change, message in [({"step_index": torch.tensor([3], dtype=torch.int32)}, "step_index 3 is outside"),
                            ({"step_index": torch.tensor([-1], dtype=torch.int32)}, "step_index -1 is outside"),
                            ({"step_index": torch.tensor([1])}, "step_index must be int32"),
                            ({"hidden_states": good["hidden_states"][..., :4]}, "hidden_states must be fp32"),
                            ({"timestep": torch.tensor([float("nan")])}, "timestep holds NaN"),
                            ({"encoder_hidden_states": None}, "encoder_hidden_states .* is missing")]:
        for dit in (onnxruntime, torch_fp32):
            with pytest.raises(SaexportError, match=message):
                dit({**good, **change})
    assert rel_err(onnxruntime(good), torch_fp32(good)) < 1e-4  # still serving


def test_onnxruntime_denoiser_refuses_a_step_index_out_of_range(tiny_fp32):
    """Before this check an out-of-range step_index reached the Python custom op, whose exception aborted the
    whole process (through C++)."""
    denoiser = OnnxRuntimeDenoiser(tiny_fp32.onnx, 3)
    inputs = dit_inputs(tiny_fp32, 0)
    args = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    for step in (3, 7, -1):
        with pytest.raises(SaexportError, match=f"step_index {step} is outside \\[0, 3\\)"):
            denoiser.predict(*args, torch.tensor([step], dtype=torch.int32))
    assert denoiser.predict(*args, torch.tensor([2], dtype=torch.int32)).shape == args[0].shape


def test_text_encoders_encode_as_encode_prompts(tiny_fp32, checkpoint, demo, tmp_path):
    umt5 = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "umt5"), "wan", weights=checkpoint)
    encoder = TextEncoder.open(umt5 / "wan_text_encoder" / "1", "cpu")
    prompts = ["a red circle", "blue stripes moving right", ""]
    assert torch.equal(encoder(prompts), encode_prompts(checkpoint, prompts, max_length=8))

    words = write_triton_repository(demo.onnx, Output(tmp_path / "words"), "demo")
    encoder = TextEncoder.open(words / "demo_text_encoder" / "1")
    bundled = resolve_weights(get_preset("wan2.1-demo"), None)
    assert torch.equal(encoder([PROMPT, ""]), encode_prompts(bundled, [PROMPT, ""], max_length=24))
    with pytest.raises(SaexportError, match="does not know the words elephant"):
        encoder(["a purple elephant"])


def test_the_vae_decodes_as_decode_latents(tiny_fp32, checkpoint, tmp_path):
    repo = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "repo"), "wan", weights=checkpoint)
    decoder = Decoder.open(repo / "wan_vae" / "1", "cpu")
    latents = torch.randn(1, 16, 2, 8, 8)
    frames = decoder(latents)
    assert frames.dtype == np.uint8 and frames.shape == (5, 64, 64, 3)
    assert np.array_equal(frames, latents_to_frames(get_preset("wan2.1-tiny").codec, latents, checkpoint / "vae"))
    with pytest.raises(SaexportError, match="latents must be fp32 \\[1, 16, 2, 8, 8\\]"):
        decoder(latents[:, :, :1])
    with pytest.raises(SaexportError, match="NaN"):
        decoder(torch.full_like(latents, float("nan")))


def test_the_pipeline_of_embeddings_runs_the_sampler_and_validates_requests(tiny_fp32, tmp_path):
    repo = write_triton_repository(tiny_fp32.onnx, Output(tmp_path / "repo"), "wan")  # no checkpoint: embeddings in
    config = read_config(repo / "wan_pipeline" / "1", "pipeline.json")
    denoiser = OnnxRuntimeDenoiser(tiny_fp32.onnx, 3)
    pipeline = Pipeline(config, denoiser)
    prompt, negative = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    request = {"prompt_embeds": prompt.numpy(), "negative_embeds": negative.numpy(),
               "seed": np.array([7], np.int64), "guidance_scale": np.array([4.0], np.float32)}
    want = sample(denoiser, SamplerSettings((16, 2, 8, 8), 3, 3.0, 4.0), prompt, negative, 7,
                  progress=lambda it, **_: it)
    assert torch.equal(torch.from_numpy(pipeline(request)), want)
    for change, message in [({"steps": np.array([4], np.int32)}, "steps must be 3"),
                            ({"seed": None}, "seed .* is missing"),
                            ({"seed": np.array([7], np.int32)}, "seed must be int64"),
                            ({"guidance_scale": np.array([np.inf], np.float32)}, "guidance_scale must be a finite"),
                            ({"prompt_embeds": prompt.numpy()[:, :4]}, "prompt_embeds must be fp32 \\[1, 8, 32\\]")]:
        with pytest.raises(SaexportError, match=message):
            pipeline({**request, **change})


# ---------------------------------------------------------------------------------------------- a real server


def test_server_answers_a_prompt_with_the_runtimes_frames(demo, tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) is not installed")
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from saexport.runtime.generation import GenerationRequest, SparsePipeline, generate
    from tests.triton_server import tritonserver

    repo = write_triton_repository(demo.onnx, Output(tmp_path / "repo"), "demo")
    generate(SparsePipeline(demo.root, "onnxruntime"), GenerationRequest(PROMPT, guidance=5.0, seed=7),
             Output(tmp_path / "latents.safetensors"))
    from safetensors.torch import load_file

    local = latents_to_frames(PIXELS, load_file(str(tmp_path / "latents.safetensors"))["latents"], None)
    bundled = resolve_weights(get_preset("wan2.1-demo"), None)

    def tensor(name, value, dtype):
        t = http.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    def ask(prompt, seed=7, **extra):
        inputs = [tensor("prompt", np.array([prompt], dtype=object), "BYTES"),
                  tensor("seed", np.array([seed], np.int64), "INT64")]
        inputs += [tensor(k, v, {np.int32: "INT32", np.float32: "FP32"}[v.dtype.type]) for k, v in extra.items()]
        return client.infer("demo_pipeline", inputs).as_numpy("frames")

    def dit_request(step):
        inputs = dit_inputs(demo, step)
        return inputs, [tensor(k, v.numpy(), "INT32" if k == "step_index" else "FP32") for k, v in inputs.items()]

    with tritonserver(repo, tmp_path) as address:
        client = http.InferenceServerClient(address)
        try:
            served = ask(PROMPT, steps=np.array([2], np.int32), guidance_scale=np.array([5.0], np.float32))
            assert served.dtype == np.uint8 and served.shape == local.shape == (2, 16, 16, 3)
            assert np.abs(served.astype(int) - local.astype(int)).max() <= 1  # exact here; 1 LSB allowed

            embeddings = client.infer("demo_text_encoder", [tensor("prompt", np.array([PROMPT, ""], dtype=object),
                                                                   "BYTES")]).as_numpy("embeddings")
            want = encode_prompts(bundled, [PROMPT, ""], max_length=24)
            assert torch.equal(torch.from_numpy(embeddings.copy()), want)

            # Bad requests get errors, and the server keeps serving.
            _, bad = dit_request(2)
            with pytest.raises(InferenceServerException, match="step_index 2 is outside \\[0, 2\\)"):
                client.infer("demo_dit", bad)
            inputs, good = dit_request(1)
            noise = client.infer("demo_dit", good).as_numpy("noise_pred")
            want = OnnxRuntimeDenoiser(demo.onnx, 2).predict(inputs["hidden_states"], inputs["timestep"],
                                                             inputs["encoder_hidden_states"], inputs["step_index"])
            assert rel_err(torch.from_numpy(noise), want) < 1e-6
            with pytest.raises(InferenceServerException, match="does not know the words elephant"):
                ask("a purple elephant")
            with pytest.raises(InferenceServerException, match="steps must be 2"):
                ask(PROMPT, steps=np.array([5], np.int32))
            assert np.array_equal(ask(PROMPT), served)  # defaults: no negative prompt, guidance 5.0
        finally:
            client.close()


def test_the_repository_readme_says_how_to_call_it(demo, tmp_path):
    repo = write_triton_repository(demo.onnx, Output(tmp_path / "repo"), "demo")
    readme = (repo / "README.md").read_text()
    # The models it describes are the ones written, and its client example sends the pipeline's own inputs.
    described = set(re.findall(r"^- `(demo_[a-z_]+)`", readme, re.MULTILINE))
    assert described == {p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()}
    pipeline = parse(repo / "demo_pipeline" / "config.pbtxt")
    sent = re.findall(r'tensor\("([a-z_]+)"', readme)
    assert set(sent) == {i.name for i in pipeline.input}
    assert f'as_numpy("{pipeline.output[0].name}")' in readme
    steps = OnnxMetadata.read(demo.onnx).steps
    assert f"step_index` must be in [0, {steps})" in readme
