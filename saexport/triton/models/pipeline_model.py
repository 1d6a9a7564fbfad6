"""Triton Python-backend model `<name>_pipeline` (BLS): a prompt in, video frames out.

Request: `prompt` STRING [1], `negative_prompt` STRING [1] (optional, ""), `seed` INT64 [1], `steps` INT32 [1]
(optional; must be the budgets' step count), `guidance_scale` FP32 [1] (optional, 5.0). Response: `frames` UINT8
[frames, height, width, 3]. The prompts go to `<name>_text_encoder`, THE sampler loop (`saexport.runtime.sampler`)
runs over a Denoiser that sends each DiT pass to `<name>_dit`, and the latents go to `<name>_vae` — all through
BLS, tensors through DLPack. A repository written without a text encoder takes `prompt_embeds` /
`negative_embeds` instead; one without a VAE answers `latents` (pipeline.json says which). The work is
`saexport.triton.serving.Pipeline`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from saexport.triton.models.backend import (
    DitOverBls,
    array_in,
    bls,
    instance_device,
    serve,
    tensor_out,
    version_folder,
)
from saexport.triton.serving import TORCH_DTYPES, Pipeline, read_config


class TritonPythonModel:
    def initialize(self, args):
        config = read_config(version_folder(args), "pipeline.json")
        denoiser = DitOverBls(config["dit_model"], int(config["steps"]), TORCH_DTYPES[config["dtype"]],
                              instance_device(args))
        self.text_encoder, self.vae = config["text_encoder_model"], config["vae_model"]
        self.pipeline = Pipeline(config, denoiser, self._encode if self.text_encoder else None,
                                 self._decode if self.vae else None)

    def execute(self, requests):
        return serve(requests, self._generate)

    def _generate(self, request):
        output = self.pipeline({spec.name: array_in(request, spec.name) for spec in self.pipeline.inputs})
        return [tensor_out(self.pipeline.output.name, output)]

    def _encode(self, prompts):
        text = pb_utils.Tensor("prompt", np.array([p.encode("utf-8") for p in prompts], dtype=np.object_))
        (embeddings,) = bls(self.text_encoder, [text], ["embeddings"])
        return from_dlpack(embeddings.to_dlpack()).float().cpu().clone()

    def _decode(self, latents):
        (frames,) = bls(self.vae, [tensor_out("latents", latents.float())], ["frames"])
        return frames.as_numpy().copy()
