"""Smoke test of the Triton repository's GPU models, in-process on a CUDA machine (no tritonserver needed there):
the work of `<name>_dit` (torch, bf16, the CUDA kernel), `<name>_text_encoder` (UMT5, bf16) and `<name>_vae`
(AutoencoderKLWan, fp32, tiled) exactly as their `model.py` runs it (`saexport.triton.serving`), checked against
the in-process runtime. One command, on the GPU machine, from the repository root:

    python3 bench/triton_gpu_smoke.py [--out DIR] [--steps 4] [--cuda-device 0]

1. exports the demo model (wan2.1-demo's weights ship with the package) in bf16 at 32x32x16 with blocks of 64 (a
   size the CUDA kernel supports) and stand-in topology/budgets, and writes its Triton repository: a bf16 graph
   without an engine, so `<name>_dit` is the torch model on the GPU;
2. opens that DiT's core on the GPU as Triton's instance would (`Dit.open(version folder, cuda:N)`), checks the
   kernel library is in use, compares one pass per step with the runtime's torch back end (`open_denoiser`, bf16,
   GPU) and with the fp32 sparse DiT on the CPU, and checks bad requests are refused and the next one served;
3. runs the pipeline's core with that DiT as its denoiser (what the BLS calls do), the word encoder and the pixel
   decoder, against `SparsePipeline(root, "torch")` on the GPU: the frames must agree within 1 LSB;
4. builds a test-size Wan2.1 checkpoint (random tiny DiT, UMT5 and VAE) and checks the served UMT5 (bf16, GPU)
   and VAE (fp32, tiled, GPU) against `encode_prompts` and `latents_to_frames` on the CPU in fp32;
5. times one DiT pass. Prints each check; exits 1 if one fails.
The kernel library is found as everywhere (`$SAEXPORT_KERNEL_LIBRARY`, else build/libsaexport_kernels.so; build it
first: cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90a && cmake --build build).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'  (' + detail + ')' if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


def export(model: str, weights: Path | None, out: Path, **run) -> Path:
    from saexport.pipeline import Models, ModelSource, make_export, make_standins, resolve_run

    models = Models(ModelSource(model, weights))
    settings = resolve_run(model, **run)
    topology, budgets = make_standins(models, settings, 0.3)
    make_export(models, settings, topology, budgets, out)
    return out


def tiny_wan_checkpoint(root: Path) -> Path:
    """wan2.1-tiny in the diffusers layout with a UMT5 text encoder (word-level tokenizer) and Wan's VAE."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from saexport.models.checkpoint import load_model

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "right", "on", "blue", "stripes"]
    load_model("wan2.1-tiny", random_weights=True, seed=11).transformer.save_pretrained(root / "transformer")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(root / "vae")
    return root


class DitAsDenoiser:
    """The Denoiser the pipeline's BLS calls amount to: each pass in the graph's dtype through the DiT core."""

    name = "triton-dit"

    def __init__(self, dit, device: torch.device):
        self.dit, self.steps, self.device, self.dtype = dit, dit.steps, device, torch.bfloat16

    def predict(self, latents, timestep, text_embeddings, step_index):
        return self.dit({"hidden_states": latents.to(self.dtype), "timestep": timestep.float(),
                         "encoder_hidden_states": text_embeddings.to(self.dtype),
                         "step_index": step_index.to(torch.int32)}).to(self.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cuda-device", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine")
        return 2
    from saexport import kernels
    from saexport.artifacts import ArtifactFolder
    from saexport.errors import SaexportError
    from saexport.folders import Output
    from saexport.models.checkpoint import ModelSource, load_model
    from saexport.models.dit import SparseWanDiT
    from saexport.models.presets import get_preset
    from saexport.models.text_encoder import encode_prompts
    from saexport.runtime.denoisers import TorchDenoiser
    from saexport.runtime.generation import Artifacts, BackendOptions, SparsePipeline, open_denoiser
    from saexport.runtime.video import latents_to_frames
    from saexport.triton.repository import write_triton_repository
    from saexport.triton.serving import Decoder, Dit, Pipeline, TextEncoder, read_config

    device = torch.device("cuda", args.cuda_device)
    torch.cuda.set_device(device)
    print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; kernel library: "
          f"{next((str(p) for p in kernels.library_candidates() if p.is_file()), 'NOT FOUND')}", flush=True)
    work = args.out or Path(tempfile.mkdtemp(prefix="triton-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)

    # 1. the demo model, bf16, and its repository
    start = time.perf_counter()
    demo = ArtifactFolder(export("wan2.1-demo", None, work / "demo", resolution="32x32", frames=16, block_size=64,
                                 layout="tile3d:4x4x4", steps=args.steps, dtype="bf16"))
    repo = write_triton_repository(demo.onnx, Output(work / "repo"), "demo", gpus=[args.cuda_device])
    settings = read_config(repo / "demo_dit" / "1", "dit.json")
    check("bf16 graph without an engine -> torch DiT", settings["backend"] == "torch",
          f"exported and written in {time.perf_counter() - start:.1f} s")

    # 2. the DiT core on the GPU
    dit = Dit.open(repo / "demo_dit" / "1", device)
    check("the DiT core runs the CUDA kernel", dit.warning is None, dit.warning or "")
    check("the DiT core is on the GPU in bf16", dit.denoiser.device == device and dit.denoiser.dtype == torch.bfloat16)
    runtime = open_denoiser(Artifacts.open(demo.root), "torch", ModelSource("wan2.1-demo"), BackendOptions("bf16"))
    loaded = load_model("wan2.1-demo", dtype=torch.float32)
    artifacts = Artifacts.open(demo.root)
    topo = artifacts.topology
    reference = TorchDenoiser(SparseWanDiT(loaded.transformer, topo.grid, topo.layout, topo.levels,
                                           artifacts.budgets.levels, topo.block_size), args.steps)  # fp32, CPU
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 3, 16, 32, 32, generator=gen)
    text = torch.randn(1, 24, 64, generator=gen)
    for step in range(args.steps):
        inputs = {"hidden_states": latents.to(device, torch.bfloat16), "timestep": torch.tensor([900.0 - 200 * step]),
                  "encoder_hidden_states": text.to(device, torch.bfloat16),
                  "step_index": torch.tensor([step], dtype=torch.int32)}
        served = dit(inputs)
        same = runtime.predict(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                               inputs["step_index"])
        fp32 = reference.predict(latents, inputs["timestep"], text, inputs["step_index"])
        check(f"step {step}: served DiT == runtime torch back end (bf16, GPU)",
              served.dtype == torch.bfloat16 and rel_err(served, same) < 1e-3, f"rel err {rel_err(served, same):.2e}")
        check(f"step {step}: served DiT ~ fp32 sparse DiT on the CPU", rel_err(served, fp32) < 5e-2,
              f"rel err {rel_err(served, fp32):.2e}")
    good = {"hidden_states": latents.to(device, torch.bfloat16), "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": text.to(device, torch.bfloat16),
            "step_index": torch.tensor([0], dtype=torch.int32)}
    for change, what in [({"step_index": torch.tensor([args.steps], dtype=torch.int32)}, "step_index out of range"),
                         ({"step_index": torch.tensor([-1], dtype=torch.int32, device=device)}, "negative step (GPU)"),
                         ({"hidden_states": good["hidden_states"].float()}, "fp32 latents to a bf16 DiT"),
                         ({"encoder_hidden_states": good["encoder_hidden_states"][:, :5]}, "short text")]:
        try:
            dit({**good, **change})
            check(f"bad request refused: {what}", False, "no error")
        except SaexportError as e:
            check(f"bad request refused: {what}", True, str(e))
    check("the next good request is served", torch.isfinite(dit(good).float()).all().item())

    # 3. the pipeline's core over the DiT core vs SparsePipeline on the GPU
    config = read_config(repo / "demo_pipeline" / "1", "pipeline.json")
    pipeline = Pipeline(config, DitAsDenoiser(dit, device), TextEncoder.open(repo / "demo_text_encoder" / "1"),
                        Decoder.open(repo / "demo_vae" / "1"))
    prompt = "a red circle moving right on blue stripes"
    frames = pipeline({"prompt": np.array([prompt.encode()], dtype=object), "seed": np.array([7], np.int64)})
    local = SparsePipeline(demo.root, "torch", options=BackendOptions("bf16"))(prompt, seed=7)
    diff = int(np.abs(frames.astype(int) - local.astype(int)).max())
    check("pipeline frames == SparsePipeline(torch, GPU) frames within 1 LSB",
          frames.shape == local.shape == (16, 32, 32, 3) and diff <= 1, f"max |diff| {diff}")

    # 4. UMT5 and the VAE of a (test-size) Wan2.1 checkpoint on the GPU
    checkpoint = tiny_wan_checkpoint(work / "checkpoint")
    tiny = ArtifactFolder(export("wan2.1-tiny", checkpoint, work / "tiny", resolution="64x64", frames=5, block_size=8,
                                 layout="identity", steps=2, dtype="bf16"))
    tiny_repo = write_triton_repository(tiny.onnx, Output(work / "tiny_repo"), "wan", gpus=[args.cuda_device],
                                        weights=checkpoint)
    encoder = TextEncoder.open(tiny_repo / "wan_text_encoder" / "1", device)
    prompts = ["a red circle", "blue stripes moving right", ""]
    err = rel_err(encoder(prompts), encode_prompts(checkpoint, prompts, max_length=8))
    check("UMT5 served (bf16, GPU) ~ encode_prompts (fp32, CPU)", err < 3e-2, f"rel err {err:.2e}")
    decoder = Decoder.open(tiny_repo / "wan_vae" / "1", device)
    tiny_latents = torch.randn(1, 16, 2, 8, 8, generator=gen)
    served_frames = decoder(tiny_latents)
    cpu_frames = latents_to_frames(get_preset("wan2.1-tiny").codec, tiny_latents, checkpoint / "vae")
    diff = int(np.abs(served_frames.astype(int) - cpu_frames.astype(int)).max())
    check("VAE served (fp32, tiled, GPU) ~ latents_to_frames (fp32, CPU)", diff <= 3, f"max |diff| {diff} LSB")

    # 5. one DiT pass
    for _ in range(3):
        dit(good)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dit(good)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"one DiT pass (demo, 4096 tokens, bf16, validation included): {1e3 * float(np.median(times)):.2f} ms "
          f"median of 10", flush=True)
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
