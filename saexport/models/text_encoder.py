"""Prompts -> Wan2.1's text embeddings with the checkpoint's own text encoder (diffusers layout:
`tokenizer/` and `text_encoder/` beside `transformer/`): UMT5, as diffusers' WanPipeline encodes them (padded
to 512 tokens, the positions past each prompt's end set to zero; cached in a file keyed by the encoder's
files and the prompts), or the demo model's word-embedding encoder (same contract, no cache needed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.models.word_encoder import WordEncoder, is_word_encoder

MAX_LENGTH = 512
NEGATIVE_SEED = 2  # synthetic negative prompt, for models without a text encoder at hand


def has_text_encoder(weights: Path) -> bool:
    return (weights / "text_encoder" / "config.json").is_file() and (weights / "tokenizer").is_dir()


def synthetic_embeddings(text_len: int, text_dim: int, prompts: int, seed: int) -> torch.Tensor:
    """SYNTHETIC text embeddings (seeded normal, fp32), for models without a text encoder at hand."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(prompts, text_len, text_dim, generator=gen)


def read_embeddings(path: Path, text_dim: int, text_len: int | None = None) -> torch.Tensor:
    """The `embeddings` tensor `[prompts, text_len, text_dim]` of a safetensors file (e.g. UMT5 outputs), fp32;
    `text_len` given: the model's, which the file must have."""
    if not path.is_file():
        raise SaexportError(f"embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            embeddings = f.get_tensor("embeddings")
    except (OSError, SafetensorError) as e:
        raise SaexportError(f"{path}: not a safetensors file with an `embeddings` tensor ({e})") from None
    if embeddings.dim() != 3 or embeddings.shape[-1] != text_dim or text_len not in (None, embeddings.shape[1]):
        length = "text_len" if text_len is None else text_len
        raise SaexportError(f"{path}: embeddings must be [prompts, {length}, {text_dim}], "
                            f"got {tuple(embeddings.shape)}")
    return embeddings.float()


def negative_embeddings(weights: Path | None, text_len: int, text_dim: int, cache: Path | None = None) -> torch.Tensor:
    """The unconditional pass's embeddings `[1, text_len, text_dim]`: the empty prompt through the checkpoint's
    text encoder, as Wan's pipeline encodes it by default; synthetic without one."""
    if weights is not None and has_text_encoder(weights):
        return encode_prompts(weights, [""], cache, max_length=text_len)
    return synthetic_embeddings(text_len, text_dim, 1, NEGATIVE_SEED)


class UMT5Encoder:
    """The checkpoint's UMT5 (`text_encoder/` + `tokenizer/`), loaded once, encoding as diffusers' WanPipeline does:
    padded to `max_length`, the positions past each prompt's end set to zero; fp32 out, on the CPU."""

    def __init__(self, checkpoint: Path, max_length: int, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.max_length, self.device = max_length, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint / "tokenizer"))
        self.model = UMT5EncoderModel.from_pretrained(str(checkpoint / "text_encoder"), torch_dtype=dtype)
        self.model = self.model.to(device).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(tokens.input_ids.to(self.device), mask).last_hidden_state.float()
        return (hidden * mask.unsqueeze(-1)).cpu()


def open_text_encoder(weights: Path, max_length: int, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> Callable[[list[str]], torch.Tensor]:
    """The checkpoint's text encoder, loaded once: prompts -> fp32 `[len(prompts), max_length, text_dim]`."""
    if not has_text_encoder(weights):
        raise SaexportError(f"{weights} has no text_encoder/ and tokenizer/ (diffusers layout): give embeddings "
                            "as a file instead")
    if is_word_encoder(weights):
        words = WordEncoder.load(weights)
        if words.tokenizer.max_length != max_length:
            raise SaexportError(f"{weights}: the word encoder reads {words.tokenizer.max_length} tokens, the model "
                                f"attends to {max_length}")
        return words.encode
    return UMT5Encoder(weights, max_length, torch.device(device), dtype).encode


def encode_prompts(weights: Path, prompts: list[str], cache: Path | None = None, device: str | torch.device = "cpu",
                   max_length: int = MAX_LENGTH, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp32 `[len(prompts), max_length, text_dim]` on the CPU; from the cache when the encoder and the prompts are
    the same. UMT5 runs on `device` in `dtype` (bf16 on a GPU, as Wan's pipeline runs it)."""
    if not has_text_encoder(weights) or is_word_encoder(weights):  # errors, or a table lookup: nothing to cache
        return open_text_encoder(weights, max_length, device, dtype)(prompts)
    key, replaceable = _cache_key(weights, prompts, max_length), cache is not None and not cache.exists()
    if cache is not None and cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") == key:
                    return f.get_tensor("embeddings")
                replaceable = "key" in meta and "prompts" in meta  # an older cache of ours, not a user's file
        except (SafetensorError, OSError):
            pass  # unreadable: encode again, and leave the file alone
    embeddings = UMT5Encoder(weights, max_length, torch.device(device), dtype).encode(prompts)
    if replaceable:
        with atomic_path(cache) as tmp:
            save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                      metadata={"key": key, "prompts": json.dumps(prompts)})
    return embeddings


def encoder_fingerprint(weights: Path) -> list:
    return [(f"{folder}/{file.name}", file.stat().st_size, file.stat().st_mtime_ns)
            for folder in ("text_encoder", "tokenizer") for file in sorted((weights / folder).iterdir())]


def _cache_key(weights: Path, prompts: list[str], max_length: int) -> str:
    return hashlib.sha256(json.dumps([prompts, max_length, encoder_fingerprint(weights)]).encode()).hexdigest()
