"""Triton Python-backend model `<name>_pipeline`: Wan2.1's sampler loop calling the `<name>_dit` model (BLS).

Inputs: prompt_embeds and negative_embeds FP32 [1, text_len, text_dim], seed INT64 [1], guidance_scale FP32
[1]. Output: latents FP32 [1, 16, frames, h, w]. The loop is saexport's own `sample` over a Denoiser that
sends each DiT call to `<name>_dit`; tensors cross to and from it through DLPack, so on a GPU the latents
never leave it.
"""

import json
import os

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from saexport.runtime.sampler import sample

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DitOverBls:
    """A saexport Denoiser whose `predict` is an inference request to the DiT model."""

    name = "triton"

    def __init__(self, model_name: str, steps: int, dtype: torch.dtype, device: torch.device):
        self.model_name, self.steps, self.dtype, self.device = model_name, steps, dtype, device

    def predict(self, latents, timestep, step_index, text_embeddings):
        inputs = [
            pb_utils.Tensor.from_dlpack("hidden_states", to_dlpack(latents.to(self.dtype).contiguous())),
            pb_utils.Tensor.from_dlpack("timestep", to_dlpack(timestep.float().contiguous())),
            pb_utils.Tensor.from_dlpack("encoder_hidden_states",
                                        to_dlpack(text_embeddings.to(self.dtype).contiguous())),
            pb_utils.Tensor.from_dlpack("step_index", to_dlpack(step_index.to(torch.int32).contiguous())),
        ]
        request = pb_utils.InferenceRequest(model_name=self.model_name, requested_output_names=["noise_pred"],
                                            inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        noise = pb_utils.get_output_tensor_by_name(response, "noise_pred")
        return from_dlpack(noise.to_dlpack()).to(self.device)


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "pipeline.json")) as f:
            self.config = json.load(f)
        device = torch.device("cuda" if args["model_instance_kind"] == "GPU" else "cpu")
        self.denoiser = DitOverBls(self.config["dit_model"], self.config["steps"], DTYPES[self.config["dtype"]],
                                   device)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: torch.from_numpy(pb_utils.get_input_tensor_by_name(request, name).as_numpy().copy())
                      for name in ("prompt_embeds", "negative_embeds", "seed", "guidance_scale")}
            latents = sample(self.denoiser, inputs["prompt_embeds"], inputs["negative_embeds"],
                             tuple(self.config["latent_shape"]), self.config["steps"], self.config["flow_shift"],
                             int(inputs["seed"][0]), float(inputs["guidance_scale"][0]),
                             progress=lambda steps, **_: steps)
            out = pb_utils.Tensor("latents", latents.float().numpy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
