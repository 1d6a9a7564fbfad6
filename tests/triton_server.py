"""A real Triton Inference Server for tests: the `tritonserver` binary that the nvidia-pytriton wheel ships,
bound to loopback on free ports, with the Python-backend stub of the running interpreter, stopped at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tritonserver(repository: Path, workdir: Path, timeout_s: float = 120) -> Iterator[str]:
    """Yields the HTTP address ("127.0.0.1:PORT") once every model is ready."""
    import pytriton
    import tritonclient.http as http

    server_root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    backends = workdir / "backends"
    shutil.copytree(server_root / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(server_root / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = dict(os.environ)
    # The stub embeds this interpreter: its libpython first, its prefix, its packages and this checkout.
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [sysconfig.get_config_var("LIBDIR"), str(libs),
                                                           env.get("LD_LIBRARY_PATH")]))
    env["PYTHONHOME"] = sys.base_prefix
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in sys.path if p.endswith("site-packages")]])
    log = open(workdir / "tritonserver.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [str(server_root / "bin" / "tritonserver"), "--model-repository", str(repository),
         "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--metrics-address", "127.0.0.1",
         "--metrics-port", str(metrics_port), "--exit-on-error", "true", "--log-verbose", "0",
         # The configs are complete: no stub per model started only to complete them (it doubles the start-up).
         "--disable-auto-complete-config", "--exit-timeout-secs", "5"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{http_port}"
    try:
        client = http.InferenceServerClient(address)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited: {(workdir / 'tritonserver.log').read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready: {(workdir / 'tritonserver.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
