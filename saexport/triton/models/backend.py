"""What the repository's `model.py` files share inside Triton's Python backend: tensors in and out (DLPack, so
GPU tensors stay on the GPU), BLS calls, the instance's device, and one response per request — an error response
for a request that fails, so that a bad request never takes the model down. Imported only inside Triton (it
needs `triton_python_backend_utils`); the models' work is in `saexport.triton.serving`."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from saexport.errors import SaexportError


def instance_device(args: dict) -> torch.device:
    """The instance's device; a GPU is made this process's current device (each instance is its own stub process),
    so that kernels launched on "the current stream" (the block-sparse attention's) run on it."""
    if args.get("model_instance_kind") == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def version_folder(args: dict) -> str:
    return os.path.join(args["model_repository"], args["model_version"])


def tensor_in(request, name: str) -> torch.Tensor | None:
    """An input as a torch tensor (on the device Triton put it on), or None where the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else from_dlpack(tensor.to_dlpack())


def array_in(request, name: str) -> np.ndarray | None:
    """An input as numpy (STRING inputs: an object array of bytes), or None where the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def tensor_out(name: str, value: torch.Tensor | np.ndarray):
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


class ModelError(SaexportError):
    """Another model's error response (BLS), with its code: a bad request stays a bad request."""

    def __init__(self, message: str, code):
        super().__init__(message)
        self.code = code


def error_response(error: Exception):
    """A bad request (SaexportError) is INVALID_ARG (HTTP 400), anything else INTERNAL (500), with its message."""
    if isinstance(error, ModelError):
        code, message = error.code, str(error)
    elif isinstance(error, SaexportError):
        code, message = pb_utils.TritonError.INVALID_ARG, str(error)
    else:
        code, message = pb_utils.TritonError.INTERNAL, f"{type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def serve(requests, handle: Callable) -> list:
    """One response per request: `handle(request)`'s output tensors, or an error response saying what was wrong
    (the model keeps serving). Unexpected exceptions are logged with their traceback."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except Exception as e:  # noqa: BLE001 (every failure becomes this request's error response)
            if not isinstance(e, SaexportError):
                pb_utils.Logger.log_error(traceback.format_exc())
            responses.append(error_response(e))
    return responses


def bls(model_name: str, inputs: list, outputs: list[str]) -> list:
    """A request to another model of the repository; its error response becomes a ModelError naming it."""
    request = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=outputs, inputs=inputs)
    response = request.exec()
    if response.has_error():
        error = response.error()
        raise ModelError(f"{model_name}: {error.message()}", error.code())  # Triton 2.51 reports INTERNAL here
    return [pb_utils.get_output_tensor_by_name(response, name) for name in outputs]


class DitOverBls:
    """A saexport Denoiser whose `predict` is an inference request to the DiT model (tensors through DLPack: on a
    GPU the latents never leave it)."""

    name = "triton"

    def __init__(self, model_name: str, steps: int, dtype: torch.dtype, device: torch.device):
        self.model_name, self.steps, self.dtype, self.device = model_name, steps, dtype, device

    def predict(self, latents, timestep, text_embeddings, step_index):
        inputs = [
            tensor_out("hidden_states", latents.to(self.dtype)),
            tensor_out("timestep", timestep.float()),
            tensor_out("encoder_hidden_states", text_embeddings.to(self.dtype)),
            tensor_out("step_index", step_index.to(torch.int32)),
        ]
        (noise,) = bls(self.model_name, inputs, ["noise_pred"])
        return from_dlpack(noise.to_dlpack()).to(self.device, copy=True)  # the response's memory is not ours
