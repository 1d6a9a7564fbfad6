"""Prompts -> Wan2.1's text embeddings with the checkpoint's own text encoder (diffusers layout:
`tokenizer/` and `text_encoder/` beside `transformer/`): UMT5, as diffusers' WanPipeline encodes them (padded
to 512 tokens, the positions past each prompt's end set to zero; cached in a file keyed by the encoder's
files and the prompts), or the demo model's word-embedding encoder (same contract, no cache needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.models.word_encoder import WordEncoder, is_word_encoder

MAX_LENGTH = 512
CALIBRATION_SEED = 1_000_003  # the demo's calibration captions: a draw of its own, never a held-out caption

# A built-in calibration set: diverse subjects, motion, camera work, lighting and styles.
CALIBRATION_PROMPTS = [
    "A golden retriever runs across a sunny meadow, slow motion, shallow depth of field.",
    "Aerial drone shot over a coastline at sunset, waves breaking on dark rocks.",
    "A chef flips vegetables in a wok, flames rising, close-up, warm kitchen light.",
    "Time-lapse of clouds rolling over snowy mountain peaks.",
    "A neon-lit city street at night in the rain, people with umbrellas, reflections on the asphalt.",
    "An astronaut floats inside a space station, Earth visible through the window.",
    "A hummingbird hovers near a red flower, macro shot, wings blurred.",
    "Two dancers perform a contemporary routine on an empty stage, spotlight from above.",
    "A steam locomotive crosses a stone bridge in autumn, smoke trailing behind.",
    "Watercolor animation of a paper boat drifting down a stream.",
    "A cat knocks a glass off a kitchen table, handheld camera, comedic timing.",
    "Underwater footage of a coral reef with schools of tropical fish.",
    "A vintage car drives along a desert highway, dust clouds, wide shot.",
    "Close-up of hands kneading dough on a floured wooden board.",
    "A medieval knight in armor walks through a foggy forest.",
    "Fireworks explode over a harbor, boats silhouetted against the sky.",
    "A child blows dandelion seeds into the wind, backlit by the evening sun.",
    "3D render of a glass sphere rolling across a checkerboard floor.",
    "A surfer rides a large wave, camera following from the water.",
    "Snow falls on a quiet village street lit by lanterns.",
    "A panda eats bamboo in a zoo enclosure, static camera.",
    "Ink dropped into water, swirling clouds of blue and black, macro.",
    "A crowded train station at rush hour, people walking in all directions, top-down view.",
    "An old man plays chess in a park, camera slowly dollying in.",
]


def has_text_encoder(weights: Path) -> bool:
    return (weights / "text_encoder" / "config.json").is_file() and (weights / "tokenizer").is_dir()


def calibration_prompts(weights: Path, count: int) -> list[str]:
    """The built-in prompts for WEST/FAST calibration: real-world scenes for UMT5; for the demo model, training
    captions (never its held-out test captions)."""
    if is_word_encoder(weights):
        from saexport.demo.videos import scenes

        return [scene.caption() for scene in scenes(count, seed=CALIBRATION_SEED)]
    return CALIBRATION_PROMPTS[:count]



def encode_prompts(weights: Path, prompts: list[str], cache: Path | None = None, device: str | torch.device = "cpu",
                   max_length: int = MAX_LENGTH) -> torch.Tensor:
    """fp32 `[len(prompts), max_length, text_dim]`; from the cache when the encoder and the prompts are the same."""
    if not has_text_encoder(weights):
        raise SaexportError(f"{weights} has no text_encoder/ and tokenizer/ (diffusers layout): give embeddings "
                            "as a file instead")
    if is_word_encoder(weights):
        encoder = WordEncoder.load(weights)
        if encoder.tokenizer.max_length != max_length:
            raise SaexportError(f"{weights}: the word encoder reads {encoder.tokenizer.max_length} tokens, the model "
                                f"attends to {max_length}")
        return encoder.encode(prompts)
    key = _cache_key(weights, prompts, max_length)
    if cache is not None and cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("embeddings")
        except (SafetensorError, OSError):
            pass  # unreadable cache: encode again
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(weights / "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(str(weights / "text_encoder")).to(device).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    with torch.no_grad():
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state.float()
    embeddings = (hidden * mask.unsqueeze(-1)).cpu()  # zeros past each prompt's end, as WanPipeline pads
    if cache is not None:
        with atomic_path(cache) as tmp:
            save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                      metadata={"key": key, "prompts": json.dumps(prompts)})
    return embeddings


def encoder_fingerprint(weights: Path) -> list:
    return [(f"{folder}/{file.name}", file.stat().st_size, file.stat().st_mtime_ns)
            for folder in ("text_encoder", "tokenizer") for file in sorted((weights / folder).iterdir())]


def _cache_key(weights: Path, prompts: list[str], max_length: int) -> str:
    return hashlib.sha256(json.dumps([prompts, max_length, encoder_fingerprint(weights)]).encode()).hexdigest()
