"""Triton Python-backend model `<name>_text_encoder`: prompts -> the embeddings the DiT attends to.

Input `prompt` STRING [n]; output `embeddings` FP32 [n, text_len, text_dim] (zeros past each prompt's end). UMT5
from the checkpoint's `text_encoder/` + `tokenizer/` (bf16 on the instance's GPU; fp32 on a CPU instance), or the
demo model's word encoder (CPU). The work is `saexport.triton.serving.TextEncoder`.
"""

from saexport.errors import SaexportError
from saexport.triton.models.backend import array_in, instance_device, serve, tensor_out, version_folder
from saexport.triton.serving import TextEncoder, decode_strings


class TritonPythonModel:
    def initialize(self, args):
        self.encoder = TextEncoder.open(version_folder(args), instance_device(args))

    def execute(self, requests):
        return serve(requests, self._encode)

    def _encode(self, request):
        prompts = array_in(request, "prompt")
        if prompts is None:
            raise SaexportError("input prompt (STRING [n]) is missing")
        return [tensor_out("embeddings", self.encoder(decode_strings(prompts, "prompt")))]
