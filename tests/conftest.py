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
