"""The kernel library builds with the README's CMake command and its C ABI answers (no GPU needed)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from saexport import kernels

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="needs nvcc and cmake")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ctypes.CDLL:
    build = tmp_path_factory.mktemp("build")
    for command in (["cmake", "-S", str(ROOT), "-B", str(build)], ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lib = ctypes.CDLL(str(build / kernels.LIBRARY_NAME))
    kernels._declare(lib)
    return lib


def test_abi_version_and_workspace_size(library):
    assert library.saexport_bsa_abi_version() == kernels.ABI_VERSION
    # 12 heads, L = 32760, block 128: n = 256 rows of 8 words each
    assert library.saexport_bsa_workspace_size(12, 32760, 128) == 12 * 256 * 8 * 4 + 4  # row masks, tile counter
    assert library.saexport_bsa_workspace_size(40, 1333, 64) == 40 * 21 * 1 * 4 + 4


@pytest.mark.parametrize("head_dim,block,dtype,status", [(96, 128, 1, 1), (128, 32, 1, 2), (128, 128, 7, 3)])
def test_unsupported_cases_are_refused_before_any_launch(library, head_dim, block, dtype, status):
    result = library.saexport_bsa_forward(None, None, None, None, dtype, 1, 100, 12, head_dim, block, 0.1,
                                          None, None, 1, None, None, None)
    assert result == status
    assert library.saexport_bsa_status_string(status).decode() != "unknown status"
