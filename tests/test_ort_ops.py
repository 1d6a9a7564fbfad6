"""libsaexport_ort_ops.so (plugins/ort): BlockSparseAttention in ONNX Runtime's CPU provider, against a float64
implementation of the contract written here from docs/ARCHITECTURE.md ("The ONNX node"), in fp32, fp16 and bf16;
bad attributes and shapes are ONNX Runtime errors in a process that stays alive; and a whole exported graph in ONNX
Runtime equals the torch back end.

The conftest builds the library into build/ once per session (tests/conftest.py, `_ort_ops_library`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
ELEMENT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
# (atol, rtol) against float64: float32 arithmetic inside, then the output rounded to its dtype (2^-11, 2^-8).
TOLERANCE = {"fp32": (1e-5, 1e-5), "fp16": (1e-4, 1e-3), "bf16": (1e-4, 6e-3)}
ATTRIBUTES = {"plugin_version": "1", "plugin_namespace": "", "num_heads": None, "head_dim": None,
              "block_size": None, "scale": None}


# --- the contract, independently -----------------------------------------------------------------------------------

def pack_levels(levels: np.ndarray) -> np.ndarray:
    """uint8 levels [heads, n, n] -> int32 [heads, n, ceil(n/4)]: level (h, u, v) is byte v % 4 (byte 0 = lowest
    bits) of word [h, u, v // 4]; padding bytes 255."""
    n = levels.shape[-1]
    words = -(-n // 4)
    padded = np.full((*levels.shape[:-1], words * 4), 255, np.uint64)
    padded[..., :n] = levels
    packed = sum(padded[..., byte::4] << np.uint64(8 * byte) for byte in range(4))
    return packed.astype(np.uint32).view(np.int32)


def contract_attention(q, k, v, topology, budgets, step: int, block_size: int, scale: float) -> np.ndarray:
    """The node's output in float64: query block u of head h attends to key blocks v with level(h, u, v) <=
    budgets[step, h]; a row with nothing kept is zeros."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, seq_len, heads, _ = q.shape
    n = -(-seq_len // block_size)
    words = topology.view(np.uint32).astype(np.int64)
    block = np.arange(seq_len) // block_size
    out = np.zeros_like(q)
    for h in range(heads):
        level = np.array([[(words[h, u, w // 4] >> (8 * (w % 4))) & 0xFF for w in range(n)] for u in range(n)])
        kept = (level <= budgets[step, h])[block[:, None], block[None, :]]  # [L, L], token by token
        rows = kept.any(axis=1)
        for b in range(batch):
            scores = np.where(kept, scale * q[b, :, h] @ k[b, :, h].T, -np.inf)[rows]
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[b, rows, h] = (weights / weights.sum(axis=1, keepdims=True)) @ v[b, :, h]
    return out


# --- graphs and inputs ---------------------------------------------------------------------------------------------

def attention_model(dtype: str, attributes: dict, shaped: bool = True, q_shape=None, n=None, steps=None,
                    bf16_io: bool = False) -> bytes:
    """One BlockSparseAttention node. fp32 and fp16 take and give their own type; bf16 (which numpy lacks) takes and
    gives fp32 through Cast nodes around the node, with inputs exactly representable in bf16, unless `bf16_io` (for
    torch tensors bound in place). `shaped` False declares no shapes, so that ONNX Runtime hands whatever it is fed
    to the node."""
    io = ELEMENT[dtype] if dtype != "bf16" or bf16_io else TensorProto.FLOAT
    cast = dtype == "bf16" and not bf16_io

    def info(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape if shaped else None)

    words = -(-n // 4) if n is not None else None
    inputs = [info(name, io, q_shape) for name in "qkv"] + [
        info("topology", TensorProto.INT32, [q_shape[2], n, words] if shaped else None),
        info("budgets", TensorProto.INT32, [steps, q_shape[2]] if shaped else None),
        info("step_index", TensorProto.INT32, [1]),
    ]
    nodes, names = [], ["q", "k", "v"]
    if cast:
        nodes += [helper.make_node("Cast", [x], [x + "_bf16"], to=TensorProto.BFLOAT16) for x in names]
        names = [x + "_bf16" for x in names]
    attrs = {key: value for key, value in attributes.items() if value is not None}
    nodes.append(helper.make_node("BlockSparseAttention", [*names, "topology", "budgets", "step_index"],
                                  ["out_bsa" if cast else "out"], name="attention_3",
                                  domain="ai.onnx.contrib", **attrs))
    if cast:
        nodes.append(helper.make_node("Cast", ["out_bsa"], ["out"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "bsa", inputs, [info("out", io, q_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)],
                              ir_version=10)  # what torch.onnx writes; newer onnx defaults past ONNX Runtime's
    return model.SerializeToString()


def session(model: bytes, library: str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest, ties to even
    return rounded.astype(np.uint32).view(np.float32)


def random_case(rng: np.random.Generator, dtype: str, batch: int, seq_len: int, heads: int, head_dim: int,
                block_size: int, steps: int) -> dict:
    """Fresh random q, k, v (never zeros), random levels and uneven per-head budgets, with query block `empty` of
    head 0 keeping nothing at any step, and head 1 dense at the first step and about half kept at the last (so the
    steps' outputs always differ)."""
    n = -(-seq_len // block_size)
    levels = rng.integers(0, 256, (heads, n, n), dtype=np.uint8)
    budgets = rng.integers(0, 256, (steps, heads)).astype(np.int32)
    budgets[:, 0] = rng.integers(20, 200, steps)
    empty = int(rng.integers(0, n))
    levels[0, empty] = rng.integers(200, 256, n)
    levels[1, 0, 0] = 255
    budgets[0, 1] = 255
    budgets[-1, 1] = min(int(np.median(levels[1])), 254)
    qkv = [rng.standard_normal((batch, seq_len, heads, head_dim)).astype(np.float32) * 1.5 for _ in range(3)]
    qkv = [t.astype(np.float16) if dtype == "fp16" else round_to_bf16(t) if dtype == "bf16" else t for t in qkv]
    return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "topology": pack_levels(levels), "budgets": budgets,
            "empty": empty, "n": n, "block_size": block_size, "scale": float(rng.uniform(0.1, 0.5))}


def attributes_of(case: dict) -> dict:
    _, _, heads, head_dim = case["q"].shape
    return {**ATTRIBUTES, "num_heads": heads, "head_dim": head_dim, "block_size": case["block_size"],
            "scale": case["scale"]}


def run(sess: ort.InferenceSession, case: dict, step: int) -> np.ndarray:
    feeds = {name: case[name] for name in ("q", "k", "v", "topology", "budgets")}
    feeds["step_index"] = np.array([step], np.int32)
    (out,) = sess.run(None, feeds)
    return out


@pytest.fixture(scope="module")
def library() -> Path:
    from saexport.runtime.ort_session import library_path

    return library_path()


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    atol, rtol = TOLERANCE[dtype]
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    error = np.abs(got - want) - (atol + rtol * np.abs(want))
    assert error.max() <= 0, f"{dtype}: worst excess {error.max():.3g} at {np.unravel_index(error.argmax(), got.shape)}"


# --- the op against the contract -----------------------------------------------------------------------------------

# (batch, L, heads, head_dim, block_size, steps): a tail block (37 = 4*8 + 5) and a topology row with padding bytes
# (n = 5: 2 words); L a whole number of blocks and one word per row; a tail longer than half a block.
SHAPES = [(2, 37, 3, 16, 8, 4), (1, 64, 2, 8, 16, 3), (1, 45, 2, 64, 16, 2)]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_contract_in_float64(library, rng, dtype, shape):
    case = random_case(rng, dtype, *shape)
    q_shape = list(case["q"].shape)
    sess = session(attention_model(dtype, attributes_of(case), q_shape=q_shape, n=case["n"], steps=shape[-1]),
                   library)
    block = case["block_size"]
    empty_rows = slice(case["empty"] * block, (case["empty"] + 1) * block)
    for step in range(shape[-1]):
        got = run(sess, case, step)
        want = contract_attention(case["q"], case["k"], case["v"], case["topology"], case["budgets"], step, block,
                                  case["scale"])
        assert_close(got, want, dtype)
        assert not np.any(got[:, empty_rows, 0]), "a query block that keeps nothing must be zeros"
    # The masks really differ between steps (else a wrong step would pass).
    assert not np.array_equal(run(sess, case, 0), run(sess, case, shape[-1] - 1))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_a_step_outside_the_budgets_is_clamped_as_the_plugin_does(library, rng, dtype):
    steps = 3
    case = random_case(rng, dtype, 1, 29, 2, 16, 8, steps)
    sess = session(attention_model(dtype, attributes_of(case), q_shape=list(case["q"].shape), n=case["n"],
                                   steps=steps), library)
    first, last = run(sess, case, 0), run(sess, case, steps - 1)
    assert not np.array_equal(first, last)
    for step in (-1, -7, -(2**31)):
        assert np.array_equal(run(sess, case, step), first)
    for step in (steps, steps + 5, 2**31 - 1):
        assert np.array_equal(run(sess, case, step), last)
    want = contract_attention(case["q"], case["k"], case["v"], case["topology"], case["budgets"], steps - 1, 8,
                              case["scale"])
    assert_close(run(sess, case, steps), want, dtype)


def check_a_case_against_the_contract(library: str) -> None:
    """In a child process (see below): one fp32 and one fp16 case with tails, every step."""
    rng = np.random.default_rng()
    for dtype in ("fp32", "fp16"):
        case = random_case(rng, dtype, 2, 45, 2, 24, 16, 2)  # 45 = 2*16 + 13; 24 = 16 + 8 features
        sess = session(attention_model(dtype, attributes_of(case), q_shape=list(case["q"].shape), n=case["n"],
                                       steps=2), library)
        for step in range(2):
            want = contract_attention(case["q"], case["k"], case["v"], case["topology"], case["budgets"], step, 16,
                                      case["scale"])
            assert_close(run(sess, case, step), want, dtype)


@pytest.mark.parametrize("kernel", ["baseline", "avx2"])
def test_the_other_instruction_set_paths_match_the_contract(library, kernel):
    """The library picks its loops for the best instruction set the CPU has (tested above); the lesser ones, which
    other CPUs take, are forced here in a child process (the choice is made once per process)."""
    code = f"from tests.test_ort_ops import check_a_case_against_the_contract as c; c({str(library)!r})"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "SAEXPORT_ORT_CPU_KERNEL": kernel})
    assert child.returncode == 0, child.stderr[-3000:]


def test_one_thread_and_the_pool_give_the_same_bits(library, rng):
    case = random_case(rng, "fp32", 2, 40, 3, 16, 8, 2)
    model = attention_model("fp32", attributes_of(case), q_shape=list(case["q"].shape), n=case["n"], steps=2)
    assert np.array_equal(run(session(model, library, threads=1), case, 1), run(session(model, library), case, 1))


def test_the_library_needs_nothing_of_onnxruntime_at_link_time(library):
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf")
    dynamic = subprocess.run(["readelf", "-d", "--dyn-syms", "-W", str(library)], capture_output=True, text=True,
                             check=True).stdout
    assert "onnxruntime" not in dynamic.lower()  # no NEEDED entry, no imported Ort symbol
    exported = [line.split()[-1] for line in dynamic.splitlines()
                if " GLOBAL " in line and " DEFAULT " in line and " UND " not in line]
    assert exported == ["RegisterCustomOps"]


def test_a_missing_library_is_one_line_that_says_how_to_build_it(monkeypatch, tmp_path):
    from saexport.errors import SaexportError
    from saexport.runtime.ort_session import ort_session

    monkeypatch.setenv("SAEXPORT_ORT_OPS_LIBRARY", str(tmp_path / "libsaexport_ort_ops.so"))
    with pytest.raises(SaexportError, match=r"not built .*`cmake -S \. -B build && cmake --build build`") as error:
        ort_session(tmp_path / "model.onnx")
    assert "\n" not in str(error.value)


# --- bad attributes and shapes: errors, never an abort --------------------------------------------------------------

GOOD = {"q": [1, 20, 2, 16], "n": 3, "steps": 2}
BAD_CASES = {
    # name: (attribute changes, input changes, expected message); attributes are checked when the session is made
    "no_num_heads": ({"num_heads": None}, {}, "lacks the INT attribute num_heads"),
    "no_scale": ({"scale": None}, {}, "lacks the FLOAT attribute scale"),
    "scale_as_int": ({"scale": 1}, {}, "lacks the FLOAT attribute scale"),
    "no_plugin_version": ({"plugin_version": None}, {}, "lacks the STRING attribute plugin_version"),
    "plugin_version_2": ({"plugin_version": "2"}, {}, "plugin_version is '2'"),
    "no_plugin_namespace": ({"plugin_namespace": None}, {}, "lacks the STRING attribute plugin_namespace"),
    "plugin_namespace": ({"plugin_namespace": "other"}, {}, "plugin_namespace is 'other'"),
    "zero_block_size": ({"block_size": 0}, {}, "must be positive"),
    "negative_heads": ({"num_heads": -2}, {}, "must be positive"),
    "negative_scale": ({"scale": -0.25}, {}, "scale must be positive"),
    # shapes are checked at every call (the graph declares none, so ONNX Runtime hands them over as fed)
    "heads_differ": ({"num_heads": 3}, {}, "q must be [batch, L, num_heads=3, head_dim=16]"),
    "head_dim_differs": ({"head_dim": 8}, {}, "q must be [batch, L, num_heads=2, head_dim=8]"),
    "q_rank_3": ({}, {"q": [20, 2, 16]}, "q must be [batch, L"),
    "k_shorter": ({}, {"k": [1, 19, 2, 16]}, "k must have q's shape [1, 20, 2, 16]"),
    "v_other_batch": ({}, {"v": [2, 20, 2, 16]}, "v must have q's shape"),
    "topology_wrong_n": ({}, {"topology": [2, 4, 1]}, "topology must be [num_heads, n, ceil(n/4)] = [2, 3, 1]"),
    "topology_wrong_heads": ({}, {"topology": [1, 3, 1]}, "topology must be"),
    "budgets_wrong_heads": ({}, {"budgets": [2, 3]}, "budgets must be [steps >= 1, num_heads=2]"),
    "budgets_no_steps": ({}, {"budgets": [0, 2]}, "budgets must be [steps >= 1"),
    "budgets_rank_1": ({}, {"budgets": [2]}, "budgets must be"),
    "step_index_two": ({}, {"step_index": [2]}, "step_index must be [1], got [2]"),
    "step_index_scalar": ({}, {"step_index": []}, "step_index must be [1], got []"),
}


def run_bad_case(name: str, library: str) -> None:
    """In a child process (see below): build the graph of BAD_CASES[name], run it, and let its error escape."""
    attribute_changes, input_changes, _ = BAD_CASES[name]
    rng = np.random.default_rng()
    attributes = {**ATTRIBUTES, "num_heads": 2, "head_dim": 16, "block_size": 8, "scale": 0.25, **attribute_changes}
    shapes = {"q": GOOD["q"], "k": GOOD["q"], "v": GOOD["q"], "topology": [2, GOOD["n"], 1],
              "budgets": [GOOD["steps"], 2], "step_index": [1], **input_changes}
    feeds = {name: rng.standard_normal(shapes[name]).astype(np.float32) for name in "qkv"}
    feeds.update({name: rng.integers(0, 256, shapes[name]).astype(np.int32) for name in ("topology", "budgets")})
    feeds["step_index"] = np.zeros(shapes["step_index"], np.int32)
    model = attention_model("fp32", attributes, shaped=False, q_shape=GOOD["q"])
    session(model, library).run(None, feeds)


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_a_bad_node_or_input_is_an_error_and_the_process_lives(library, name):
    code = f"from tests.test_ort_ops import run_bad_case; run_bad_case({name!r}, {str(library)!r})"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # A Python exception exits 1; an abort or a crash would be a negative return code (a signal) or 134.
    assert child.returncode == 1, f"exit {child.returncode}\n{child.stderr[-3000:]}"
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith("onnxruntime.capi.onnxruntime_pybind11_state."), child.stderr[-3000:]
    assert "BlockSparseAttention node 'attention_3': " in last and BAD_CASES[name][2] in last, last


def test_the_bad_case_runner_runs_a_good_case(library):
    """The child's graph is fine apart from each case's one change (else the cases would prove nothing)."""
    BAD_CASES["good"] = ({}, {}, "")
    try:
        run_bad_case("good", str(library))
    finally:
        del BAD_CASES["good"]


# --- a whole exported graph ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-5), ("fp16", 5e-3)])  # measured: 2e-6, 8e-4
def test_an_exported_graph_in_onnxruntime_equals_the_torch_back_end(tmp_path, dtype, tolerance):
    """The tiny model's export at a grid whose last block is partial (36 tokens, blocks of 8), every step, against
    the sparse DiT in torch. (A bf16 graph does not load in ONNX Runtime's CPU provider, which lacks bf16 kernels
    for other ops, e.g. Sigmoid; the node's bf16 is tested above.)"""
    import torch

    from saexport.exporter.onnx_export import build_sparse_dit, example_inputs
    from saexport.models.checkpoint import ModelSource, parse_dtype
    from saexport.pipeline import Models, make_export, make_standins, resolve_run, video_of
    from saexport.runtime.ort_session import ort_session, run_dit
    from tests.conftest import rel_err

    source = ModelSource("wan2.1-tiny", random_weights=True, weights_seed=int(torch.randint(0, 1000, ())))
    models = Models(source)
    run_settings = resolve_run("wan2.1-tiny", resolution="64x48", frames=9, block_size=8, layout="identity",
                               steps=3, dtype=dtype)
    topology, budgets = make_standins(models, run_settings, 0.4)
    exported = make_export(models, run_settings, topology, budgets, tmp_path)
    sess = ort_session(exported.path)
    loaded, video = models.get(parse_dtype(dtype)), video_of(source, run_settings)
    assert video.token_grid(loaded.preset.patch_size) == (3, 3, 4)  # 36 tokens: blocks 8, 8, 8, 8, 4
    module = build_sparse_dit(loaded, topology, budgets, video)
    args = list(example_inputs(loaded, video, parse_dtype(dtype)))
    args[1] = torch.tensor([float(torch.randint(1, 1000, ()))])
    outputs = []
    for step in range(budgets.steps):
        args[3] = torch.tensor([step], dtype=torch.int32)
        got = run_dit(sess, args)
        with torch.no_grad():
            want = module(*args)
        assert rel_err(got, want) < tolerance, (step, rel_err(got, want))
        outputs.append(got)
    # A step past the budgets (what once killed the interpreter through the PyOp) is the last step's output.
    args[3] = torch.tensor([budgets.steps], dtype=torch.int32)
    assert torch.equal(run_dit(sess, args), outputs[-1])


# --- the CUDA execution provider (on the GPU machine: pytest -m gpu; needs onnxruntime-gpu) -------------------------

def cuda_provider_session(model: bytes, library: str | Path) -> ort.InferenceSession:
    import torch

    from saexport.runtime.ort_session import providers

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=providers(torch.device("cuda", 0)))


def needs_cuda_provider():
    import torch

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a GPU and onnxruntime-gpu")


def run_on_gpu(sess: ort.InferenceSession, case: dict, step: int, dtype: str):
    """One run through IO binding on torch tensors of the GPU, into an output poisoned with NaN (so every element
    must be written)."""
    import torch

    from saexport.runtime.ort_session import run_bound

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    inputs = {name: torch.from_numpy(np.asarray(case[name], np.float32)).to("cuda", torch_dtype) for name in "qkv"}
    inputs.update({name: torch.from_numpy(case[name]).cuda() for name in ("topology", "budgets")})
    inputs["step_index"] = torch.tensor([step], dtype=torch.int32, device="cuda")
    out = torch.full(case["q"].shape, float("nan"), dtype=torch_dtype, device="cuda")
    run_bound(sess, inputs, out)
    return out.float().cpu().numpy()


# (batch, L, heads, head_dim, block_size, steps): the kernel's head dims and blocks, each with a partial last block.
CUDA_SHAPES = [(2, 300, 3, 64, 64, 3), (1, 300, 2, 128, 128, 2), (1, 333, 2, 64, 128, 2)]
CUDA_TOLERANCE = {"fp16": (2e-3, 5e-3), "bf16": (1e-2, 2e-2)}  # the kernel's P V in the input's precision


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_cuda_provider_matches_the_contract_in_float64(library, rng, dtype, shape):
    needs_cuda_provider()
    steps = shape[-1]
    case = random_case(rng, dtype, *shape)
    model = attention_model(dtype, attributes_of(case), q_shape=list(case["q"].shape), n=case["n"], steps=steps,
                            bf16_io=True)
    sess = cuda_provider_session(model, library)
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    block = case["block_size"]
    empty_rows = slice(case["empty"] * block, (case["empty"] + 1) * block)
    atol, rtol = CUDA_TOLERANCE[dtype]
    outputs = []
    for step in range(steps):
        got = run_on_gpu(sess, case, step, dtype)
        want = contract_attention(case["q"], case["k"], case["v"], case["topology"], case["budgets"], step, block,
                                  case["scale"])
        assert np.isfinite(got).all(), "an output element was not written"
        excess = np.abs(got - want) - (atol + rtol * np.abs(want))
        assert excess.max() <= 0, f"{dtype} step {step}: worst excess {excess.max():.3g}"
        assert not np.any(got[:, empty_rows, 0]), "a query block that keeps nothing must be zeros"
        outputs.append(got)
    assert not np.array_equal(outputs[0], outputs[-1])
    for step, want in ((-3, outputs[0]), (steps, outputs[-1]), (2**31 - 1, outputs[-1])):  # clamped, as the plugin
        assert np.array_equal(run_on_gpu(sess, case, step, dtype), want)


@pytest.mark.gpu
def test_the_cuda_provider_refuses_what_its_kernel_cannot_run_and_the_process_lives(library, rng):
    needs_cuda_provider()
    case = random_case(rng, "fp16", 1, 64, 2, 32, 16, 2)  # head_dim 32, blocks of 16: not the kernel's
    model = attention_model("fp16", attributes_of(case), q_shape=list(case["q"].shape), n=case["n"], steps=2)
    with pytest.raises(Exception, match="the CUDA kernel needs head_dim and block_size of 64 or 128, got 32 and 16"):
        cuda_provider_session(model, library).run(None, {**{n: case[n] for n in ("q", "k", "v", "topology",
                                                                                 "budgets")},
                                                         "step_index": np.zeros(1, np.int32)})
    case = random_case(rng, "fp32", 1, 64, 2, 64, 64, 2)
    model = attention_model("fp32", attributes_of(case), q_shape=list(case["q"].shape), n=case["n"], steps=2)
    sess = cuda_provider_session(model, library)
    feeds = {**{n: case[n] for n in ("q", "k", "v", "topology", "budgets")}, "step_index": np.zeros(1, np.int32)}
    if sess.get_providers()[0] == "CUDAExecutionProvider":
        try:  # fp32 is the CPU provider's: either ONNX Runtime places the node there, or the CUDA op refuses it
            got = sess.run(None, feeds)[0]
            want = contract_attention(case["q"], case["k"], case["v"], case["topology"], case["budgets"], 0, 64,
                                      case["scale"])
            assert_close(got, want, "fp32")
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's own exception types
            assert "the CUDA kernel runs fp16 and bf16" in str(error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [("fp16", 5e-3), ("bf16", 3e-2)])
def test_an_exported_graph_on_the_cuda_provider_equals_the_torch_back_end(tmp_path, dtype, tolerance):
    """The demo architecture (heads of 64, blocks of 64) at a grid with a partial last block, exported in fp16/bf16,
    in ONNX Runtime's CUDA provider against the sparse DiT in torch on the same GPU (the kernel library), every
    step; and `saexport verify` on it."""
    import torch

    from saexport.models.checkpoint import ModelSource, parse_dtype
    from saexport.pipeline import Models, make_export, make_standins, resolve_run
    from saexport.runtime.denoisers import OnnxRuntimeDenoiser, TorchDenoiser
    from saexport.runtime.generation import Artifacts, BackendOptions, open_denoiser
    from tests.conftest import rel_err

    needs_cuda_provider()
    source = ModelSource("wan2.1-demo", random_weights=True, weights_seed=int(torch.randint(0, 1000, ())))
    models = Models(source)
    run_settings = resolve_run("wan2.1-demo", resolution="40x32", frames=12, block_size=64, layout="identity",
                               steps=3, dtype=dtype)
    topology, budgets = make_standins(models, run_settings, 0.4)
    make_export(models, run_settings, topology, budgets, tmp_path)
    artifacts = Artifacts.open(tmp_path)
    graph = open_denoiser(artifacts, "onnxruntime", source)  # fp16/bf16: the GPU by default
    assert isinstance(graph, OnnxRuntimeDenoiser) and graph.device.type == "cuda"
    torch_side = open_denoiser(artifacts, "torch", source, BackendOptions(dtype))
    assert isinstance(torch_side, TorchDenoiser) and torch_side.dtype == parse_dtype(dtype)
    text = torch.randn(1, artifacts.preset.text_len, artifacts.preset.config["text_dim"])
    latents = torch.randn(1, *artifacts.video.latent_shape())
    for step in range(budgets.steps):
        args = (latents, torch.tensor([float(torch.randint(1, 1000, ()))]), text,
                torch.tensor([step], dtype=torch.int32))
        got, want = graph.predict(*args), torch_side.predict(*args)
        assert got.dtype == parse_dtype(dtype) and got.device.type == "cuda"
        assert rel_err(got.float(), want.float()) < tolerance, (step, rel_err(got.float(), want.float()))

    # Triton's DiT model over the same graph in the CUDA provider (`saexport triton --dit onnxruntime`), in process.
    from saexport.folders import Output
    from saexport.triton.repository import write_triton_repository
    from saexport.triton.serving import Dit

    repo = write_triton_repository(tmp_path / "model.onnx", Output(tmp_path / "repo"), "wan", dit="onnxruntime")
    served = Dit.open(repo / "wan_dit" / "1", "cuda:0")
    request = {"hidden_states": latents.to("cuda", parse_dtype(dtype)), "timestep": args[1].cuda(),
               "encoder_hidden_states": text.to("cuda", parse_dtype(dtype)), "step_index": args[3]}
    assert rel_err(served(request).float(), graph.predict(*args).float()) < 1e-6

    from click.testing import CliRunner

    from saexport.cli import main

    result = CliRunner().invoke(main, ["verify", "--model", "wan2.1-demo", "--random-weights", "--weights-seed",
                                       str(source.weights_seed), "--artifacts", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs torch: max relative error" in result.output
