"""Triton Python-backend model `<name>_dit` on ONNX Runtime: the exported graph with the plan's inputs and
outputs, for machines without TensorRT (and for testing the repository on a CPU)."""

import os

import torch
import triton_python_backend_utils as pb_utils

from saexport.runtime.ort_session import ort_session, run_dit

INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "step_index")


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort_session(os.path.join(folder, "model.onnx"))

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = [torch.from_numpy(pb_utils.get_input_tensor_by_name(request, n).as_numpy().copy()) for n in INPUTS]
            noise = run_dit(self.session, inputs)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("noise_pred", noise.numpy())]))
        return responses
