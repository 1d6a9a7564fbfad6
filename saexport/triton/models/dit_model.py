"""Triton Python-backend model `<name>_dit`, for repositories without a TensorRT engine: one pass of the sparse
DiT with the plan's inputs and outputs (hidden_states, timestep, encoder_hidden_states, step_index -> noise_pred).

`dit.json` picks the back end: `torch` (the checkpoint's `SparseWanDiT` with the topology and budgets beside this
file, bf16 on the instance's GPU, attention through the CUDA kernel library) or `onnxruntime` (the exported fp32
graph on the CPU). Inputs are validated — dtypes, shapes, `step_index` in [0, steps) — before the DiT runs; a bad
request gets an error response. The work is `saexport.triton.serving.Dit`.
"""

import triton_python_backend_utils as pb_utils

from saexport.triton.models.backend import instance_device, serve, tensor_in, tensor_out, version_folder
from saexport.triton.serving import Dit


class TritonPythonModel:
    def initialize(self, args):
        self.dit = Dit.open(version_folder(args), instance_device(args))
        if self.dit.warning:
            pb_utils.Logger.log_warn(f"{args['model_name']}: {self.dit.warning}")
        self.names = [spec.name for spec in self.dit.inputs]

    def execute(self, requests):
        return serve(requests, self._predict)

    def _predict(self, request):
        noise = self.dit({name: tensor_in(request, name) for name in self.names})
        return [tensor_out(self.dit.output.name, noise)]
