"""The Triton model repository: configs parsed by Triton's own protobuf, and a real server answering."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from saexport.exporter.onnx_export import export_onnx
from saexport.layout import parse_layout
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.denoisers import OnnxRuntimeDenoiser
from saexport.runtime.sampler import sample
from saexport.topology.standin import standin_budgets, standin_topology
from saexport.triton.repository import write_triton_repository
from tests.conftest import rel_err

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] missing")
VIDEO = parse_video_shape("64x64", 5)  # grid 2 x 4 x 4


@pytest.fixture
def exported(tiny, tmp_path):
    p = tiny.preset
    topology = standin_topology(p.name, p.config_hash(), tiny.weights_id, p.num_layers, p.num_heads,
                                VIDEO.token_grid(p.patch_size), 8, parse_layout("identity"))
    budgets = standin_budgets(topology, steps=3)
    return tiny, export_onnx(tiny, topology, budgets, VIDEO, tmp_path / "artifacts", torch.float32).path


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_tensorrt_repository_configs(exported, tmp_path):
    _, onnx_path = exported
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"a plan would be here")
    repo = write_triton_repository(onnx_path, tmp_path / "repo", "wan", engine_path=engine, gpus=[0, 1])
    dit = parse(repo / "wan_dit" / "config.pbtxt")
    assert dit.platform == "tensorrt_plan" and dit.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims)) for i in dit.input] == [
        ("hidden_states", model_config_pb2.TYPE_FP32, [1, 16, 2, 8, 8]),
        ("timestep", model_config_pb2.TYPE_FP32, [1]),
        ("encoder_hidden_states", model_config_pb2.TYPE_FP32, [1, 8, 32]),
        ("step_index", model_config_pb2.TYPE_INT32, [1]),
    ]
    assert [(o.name, list(o.dims)) for o in dit.output] == [("noise_pred", [1, 16, 2, 8, 8])]
    assert list(dit.instance_group[0].gpus) == [0, 1]
    assert (repo / "wan_dit" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    pipeline = parse(repo / "wan_pipeline" / "config.pbtxt")
    assert pipeline.backend == "python" and [o.name for o in pipeline.output] == ["latents"]
    assert "plugins=" in (repo / "README.md").read_text()


def test_server_answers_like_the_in_process_runtime(exported, tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) is not installed")
    import tritonclient.http as http

    from tests.triton_server import tritonserver

    tiny, onnx_path = exported
    repo = write_triton_repository(onnx_path, tmp_path / "repo", "wan")
    assert parse(repo / "wan_dit" / "config.pbtxt").backend == "python"
    prompt, negative = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    with tritonserver(repo, tmp_path) as address:
        client = http.InferenceServerClient(address)

        def tensor(name, value, dtype):
            t = http.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            return t

        inputs = [tensor("prompt_embeds", prompt.numpy(), "FP32"), tensor("negative_embeds", negative.numpy(), "FP32"),
                  tensor("seed", np.array([7], np.int64), "INT64"),
                  tensor("guidance_scale", np.array([5.0], np.float32), "FP32")]
        served = torch.from_numpy(client.infer("wan_pipeline", inputs).as_numpy("latents"))
    local = sample(OnnxRuntimeDenoiser(onnx_path, 3), prompt, negative, VIDEO.latent_shape(),
                   3, 3.0, 7, 5.0, progress=lambda it, **_: it)
    assert served.shape == (1, 16, 2, 8, 8)
    assert rel_err(served, local) < 1e-5
