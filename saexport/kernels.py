"""ctypes binding of the CUDA kernel library's C ABI (`plugins/capi/saexport_bsa.h`).

The library is looked up in `$SAEXPORT_KERNEL_LIBRARY`, then in `build/` of a source checkout.
Build it with `cmake -S . -B build && cmake --build build`.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import NamedTuple

import torch

LIBRARY_NAME = "libsaexport_kernels.so"
ABI_VERSION = 2  # plugins/capi/saexport_bsa.h
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)


class KernelLibraryError(RuntimeError):
    pass


class PackedMasks(NamedTuple):
    """One layer's masks as the ONNX node and the kernel take them: the packed INT32 threshold map
    `[heads, n, ceil(n/4)]`, the budgets INT32 `[steps, heads]`, and the block size."""

    topology: torch.Tensor
    budgets: torch.Tensor
    block_size: int


def library_candidates() -> list[Path]:
    env = os.environ.get("SAEXPORT_KERNEL_LIBRARY")
    if env:
        return [Path(env)]
    return [Path(__file__).resolve().parent.parent / "build" / LIBRARY_NAME]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The kernel library, or None when it is not built. A library of another ABI is an error."""
    for path in library_candidates():
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.saexport_bsa_abi_version() != ABI_VERSION:
                raise KernelLibraryError(f"{path} has ABI {lib.saexport_bsa_abi_version()}, expected {ABI_VERSION}")
            return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.saexport_bsa_abi_version.restype = i
    lib.saexport_bsa_status_string.restype = ctypes.c_char_p
    lib.saexport_bsa_status_string.argtypes = [i]
    lib.saexport_bsa_workspace_size.restype = ctypes.c_size_t
    lib.saexport_bsa_workspace_size.argtypes = [i, i, i]
    lib.saexport_bsa_forward.restype = i
    lib.saexport_bsa_forward.argtypes = [p, p, p, p, i, i, i, i, i, i, f, p, p, i, p, p, p]


def current_gpu() -> tuple[str, tuple[int, int]] | None:
    """This machine's GPU (name, compute capability), or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def supports(q: torch.Tensor, block_size: int) -> bool:
    return (q.is_cuda and q.dtype in _DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and block_size in SUPPORTED_BLOCK_SIZES and load_library() is not None)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks, step_index: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Launch on the current stream; no host synchronisation. Inputs are validated by the caller. The output and
    the workspace come from torch's caching allocator (under CUDA graph capture, from the graph's pool)."""
    topology, budgets, block_size = masks
    lib = load_library()
    if lib is None:
        raise KernelLibraryError(f"{LIBRARY_NAME} is not built (looked in {library_candidates()})")
    q, k, v = (t.contiguous() for t in (q, k, v))
    batch, seq_len, heads, head_dim = q.shape
    out = torch.empty_like(q)
    workspace = torch.empty(lib.saexport_bsa_workspace_size(heads, seq_len, block_size), dtype=torch.uint8,
                            device=q.device)
    status = lib.saexport_bsa_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), _DTYPES[q.dtype], batch, seq_len, heads,
        head_dim, block_size, scale, topology.contiguous().data_ptr(), budgets.contiguous().data_ptr(),
        budgets.shape[0], step_index.data_ptr(), workspace.data_ptr(), torch.cuda.current_stream().cuda_stream,
    )
    if status != 0:
        raise KernelLibraryError(f"saexport_bsa_forward: {lib.saexport_bsa_status_string(status).decode()}")
    return out
