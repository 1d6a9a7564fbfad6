"""Triton Python-backend model `<name>_vae`: latents -> uint8 video frames.

Input `latents` FP32 [1, channels, f, h, w]; output `frames` UINT8 [frames, height, width, 3]. Wan's VAE
(diffusers `AutoencoderKLWan`, tiled, on the instance's GPU) as `saexport.runtime.video.decode_latents` decodes,
or the demo model's pixel codec (its latents are the pixels). The work is `saexport.triton.serving.Decoder`.
"""

from saexport.triton.models.backend import instance_device, serve, tensor_in, tensor_out, version_folder
from saexport.triton.serving import Decoder


class TritonPythonModel:
    def initialize(self, args):
        self.decoder = Decoder.open(version_folder(args), instance_device(args))

    def execute(self, requests):
        return serve(requests, self._decode)

    def _decode(self, request):
        return [tensor_out(self.decoder.frames.name, self.decoder(tensor_in(request, self.decoder.latents.name)))]
