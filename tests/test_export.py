import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from saexport.artifacts import BlockedGrid, OnnxMetadata
from saexport.errors import SaexportError
from saexport.exporter.onnx_export import INPUT_NAMES, build_sparse_dit, example_inputs, export_onnx
from saexport.layout import parse_layout
from saexport.levels import unpack_levels
from saexport.models.checkpoint import load_model
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.generation import model_identity
from saexport.runtime.ort_session import ort_session, run_dit
from saexport.topology.standin import standin_budgets, standin_topology
from tests.conftest import rel_err


def artifacts(loaded, video, block_size=16, layout="tile3d:1x4x4", steps=4, density=0.3):
    p = loaded.preset
    grid = video.token_grid(p.patch_size)
    topology = standin_topology(model_identity(loaded), p.num_layers, p.num_heads,
                                BlockedGrid(grid, block_size, parse_layout(layout)),
                                seed=int(torch.randint(0, 1000, ())))
    return topology, standin_budgets(topology, steps, density)


@pytest.mark.parametrize("resolution,frames,dtype", [
    ("64x48", 9, torch.float32), ("64x48", 9, torch.bfloat16), ("96x64", 5, torch.float16),
])
def test_export_passes_checker_and_follows_the_contract(tmp_path, resolution, frames, dtype):
    loaded = load_model("wan2.1-tiny", random_weights=True, dtype=dtype)
    video = parse_video_shape(resolution, frames)
    topology, budgets = artifacts(loaded, video)
    exported = export_onnx(loaded, topology, budgets, video, tmp_path)  # runs the full checker
    model = onnx.load(exported.path)

    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == INPUT_NAMES
    elem = {torch.float32: onnx.TensorProto.FLOAT, torch.bfloat16: onnx.TensorProto.BFLOAT16,
            torch.float16: onnx.TensorProto.FLOAT16}[dtype]
    assert inputs["hidden_states"].elem_type == elem
    assert inputs["timestep"].elem_type == onnx.TensorProto.FLOAT
    assert inputs["step_index"].elem_type == onnx.TensorProto.INT32
    assert [d.dim_value for d in inputs["step_index"].shape.dim] == [1]
    assert [d.dim_value for d in inputs["hidden_states"].shape.dim] == [1, *video.latent_shape()]
    assert [o.name for o in model.graph.output] == ["noise_pred"]

    nodes = [n for n in model.graph.node if n.op_type == "BlockSparseAttention"]
    assert len(nodes) == loaded.preset.num_layers
    initializers = {i.name: i for i in model.graph.initializer}
    n = topology.levels.shape[-1]
    for layer, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"plugin_version": b"1", "plugin_namespace": b"", "num_heads": 4, "head_dim": 16,
                         "block_size": 16, "scale": pytest.approx(0.25)}
        assert node.input[5] == "step_index"
        topo, bud = (onnx.numpy_helper.to_array(initializers[name]) for name in node.input[3:5])
        assert topo.dtype == np.int32 and topo.shape == (4, n, (n + 3) // 4)
        assert torch.equal(unpack_levels(torch.from_numpy(topo)), topology.levels[layer].int())
        assert bud.dtype == np.int32 and bud.shape == (4, 4)
        assert torch.equal(torch.from_numpy(bud), budgets.levels[:, layer].int())
    meta = OnnxMetadata.read(exported.path)
    assert meta.random_weights and meta.topology_hash == topology.hash() and meta.budgets_hash == budgets.hash()
    assert (meta.width, meta.height, meta.frames) == (video.width, video.height, video.frames)
    assert meta.steps == budgets.steps and meta == exported.metadata  # what `saexport triton` reads


def test_onnxruntime_matches_pytorch_at_real_sparsity(tmp_path):
    loaded = load_model("wan2.1-tiny", random_weights=True, seed=int(torch.randint(0, 1000, ())))
    video = parse_video_shape("64x64", 9)  # grid 3 x 4 x 4 = 48 tokens, blocks of 8: n = 6
    topology, budgets = artifacts(loaded, video, block_size=8, layout="tile3d:1x2x4", steps=5, density=0.3)
    assert 0.2 < budgets.mean_density < 0.45
    exported = export_onnx(loaded, topology, budgets, video, tmp_path)
    session = ort_session(exported.path)
    module = build_sparse_dit(loaded, topology, budgets, video)
    outputs = []
    for step in (0, 3):
        args = list(example_inputs(loaded, video, torch.float32))
        args[3] = torch.tensor([step], dtype=torch.int32)
        got = run_dit(session, args)
        with torch.no_grad():
            want = module(*args)
        assert rel_err(got, want) < 1e-4
        outputs.append((args, want))
    # The two steps really use different masks: step 0's inputs at step 3 give another output.
    args, want0 = outputs[0]
    with torch.no_grad():
        other = module(*args[:3], torch.tensor([3], dtype=torch.int32))
    assert rel_err(other, want0) > 1e-4


def test_topology_for_another_grid_is_refused(tmp_path):
    loaded = load_model("wan2.1-tiny", random_weights=True)
    topology, budgets = artifacts(loaded, parse_video_shape("64x48", 9))
    with pytest.raises(SaexportError, match=r"its token grid is \(3, 3, 4\), the export's is \(3, 4, 4\)"):
        export_onnx(loaded, topology, budgets, parse_video_shape("64x64", 9), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_budgets_for_another_topology_are_refused(tmp_path):
    loaded = load_model("wan2.1-tiny", random_weights=True)
    video = parse_video_shape("64x48", 9)
    topology, _ = artifacts(loaded, video)
    _, other_budgets = artifacts(loaded, video)
    with pytest.raises(SaexportError, match="tuned on another topology"):
        export_onnx(loaded, topology, other_budgets, video, tmp_path)


@pytest.mark.parametrize("resolution,frames,message", [
    ("480p", 80, "`frames` must be 4k\\+1"),
    ("100x64", 9, "multiples of 16"),
    ("1080i", 9, "is not 480p, 720p"),
])
def test_bad_video_shape(resolution, frames, message):
    with pytest.raises(SaexportError, match=message):
        parse_video_shape(resolution, frames)


def test_480p_81_frames_grid():
    video = parse_video_shape("480p", 81)
    assert video.latent_shape() == (16, 21, 60, 104)
    assert video.token_grid((1, 2, 2)) == (21, 30, 52)


def test_an_export_prints_progress_not_torchs_notices(tmp_path):
    """Issue 24: exports printed torch.onnx's skipped torchvision ops and FutureWarnings from inside torch."""
    done = subprocess.run([sys.executable, "-m", "saexport", "export", "--model", "wan2.1-tiny", "--random-weights",
                           "--resolution", "64x48", "--frames", "9", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "exporting ONNX" in said and (tmp_path / "out" / "model.onnx").is_file()
    assert "torchvision" not in said and "Warning" not in said, said
