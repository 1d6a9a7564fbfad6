import fcntl
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _ort_ops_library():
    """Build libsaexport_ort_ops.so (ONNX Runtime's BlockSparseAttention) into build/ once per session, where
    saexport finds it as in a user's checkout: incremental, so well under a second when current (a build/ configured
    already keeps its options). Without cmake, or where the build fails, the tests that need the library fail with
    the error that says how to build it."""
    if os.environ.get("SAEXPORT_ORT_OPS_LIBRARY") or shutil.which("cmake") is None:
        return
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    commands = [["cmake", "-S", str(ROOT), "-B", str(build)],
                ["cmake", "--build", str(build), "--target", "saexport_ort_ops", "-j2"]]
    with open(build / ".saexport-test-build.lock", "w") as lock:  # one build at a time in a shared checkout
        fcntl.flock(lock, fcntl.LOCK_EX)
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-2000:]}", stacklevel=1)
                return


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run (torch's default seed is fixed); pytest shows the seed on failure.
    print(f"torch seed {torch.seed()}")


@pytest.fixture
def tiny():
    from saexport.models.checkpoint import load_model  # not at import: GPU-only runs lack diffusers

    return load_model("wan2.1-tiny", random_weights=True, seed=torch.randint(0, 2**31, ()).item())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got - want).norm() / want.norm())


def denoise_held_out_video(model_name: str, frames: int, height: int, width: int, sigma: float = 0.5):
    """The shipped weights of `model_name` on one held-out video of their own training data noised to `sigma`:
    `(loaded, flow, estimate_error, noisy_error)`, the mean squared errors against the video of the one-step
    estimate x_t - sigma * flow (x0 when the flow is right) and of the rescaled noisy video itself."""
    from saexport.demo import video_module
    from saexport.models.checkpoint import load_model
    from saexport.models.text_encoder import encode_prompts

    loaded = load_model(model_name)  # no weights path: the shipped ones
    module = video_module(model_name)
    scene = module.scenes(1, seed=11, held_out=True)
    video = module.render(scene, frames, height, width, seed=5)
    text = encode_prompts(loaded.path, [scene[0].caption()], max_length=loaded.preset.text_len)
    noisy = (1 - sigma) * video + sigma * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flow = loaded.transformer(noisy, torch.tensor([sigma * 1000]), text, return_dict=False)[0]
    estimate_error = (noisy - sigma * flow - video).pow(2).mean()
    noisy_error = (noisy / (1 - sigma) - video).pow(2).mean()
    return loaded, flow, estimate_error, noisy_error
