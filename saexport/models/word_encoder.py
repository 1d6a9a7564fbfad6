"""The demo model's text encoder: a word tokenizer over a closed vocabulary and two embedding tables.

It stands where UMT5 stands for Wan2.1 and keeps UMT5's contract with the DiT: `[prompts, max_length,
text_dim]` fp32, zeros past each prompt's end (so the empty prompt encodes to zeros). A word's embedding
plus its position's embedding, so "a red circle on blue stripes" differs from "a blue circle on red stripes".
With `phrase_starts` (words that open a phrase, e.g. "and", "on", "camera"), each word's vector also carries the
mean of its phrase's word vectors, as UMT5's vectors carry their context: the DiT's cross-attention reads one text
token at a time, and a table lookup leaves which shape and motion belong to which colour to be worked out from
positions, which wan2.1-eval's tables alone never learned (docs/BENCHMARKS.md, the caption check; its shipped
weights were trained on with phrases). A fixed, parameter-free context: the tables stay the model's only text
weights, and an encoder given phrases reads trained tables as is.
Stored in the diffusers layout's places: `tokenizer/vocab.json` and `text_encoder/{config.json,
model.safetensors}` with `model_type` "saexport-word-embedding".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saexport.atomic import atomic_path, write_text_atomic
from saexport.errors import SaexportError

MODEL_TYPE = "saexport-word-embedding"


class WordTokenizer:
    def __init__(self, vocabulary: list[str], max_length: int):
        self.vocabulary = list(vocabulary)
        self.index = {word: i + 1 for i, word in enumerate(self.vocabulary)}  # 0 is padding
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """int64 `[len(prompts), max_length]`, zero-padded; unknown words and long prompts are errors."""
        tokens = torch.zeros(len(prompts), self.max_length, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z]+", prompt.lower())
            unknown = sorted({w for w in words if w not in self.index})
            if unknown:
                raise SaexportError(f"the demo model does not know the words {', '.join(unknown)}; it knows: "
                                    f"{' '.join(self.vocabulary)}")
            if len(words) > self.max_length:
                raise SaexportError(f"prompt of {len(words)} words; the demo model reads at most {self.max_length}")
            tokens[row, : len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.int64)
        return tokens


class WordEncoder(torch.nn.Module):
    def __init__(self, vocabulary: list[str], text_dim: int, max_length: int, phrase_starts: tuple[str, ...] = ()):
        super().__init__()
        self.tokenizer = WordTokenizer(vocabulary, max_length)
        self.words = torch.nn.Embedding(len(vocabulary) + 1, text_dim, padding_idx=0)
        self.positions = torch.nn.Embedding(max_length, text_dim)
        torch.nn.init.normal_(self.positions.weight, std=0.1)
        unknown = [w for w in phrase_starts if w not in self.tokenizer.index]
        if unknown:
            raise ValueError(f"phrase starts {unknown} are not in the vocabulary")
        self.phrase_starts = tuple(phrase_starts)
        # Not in the state dict: the config names the words (a buffer so that it follows the module's device).
        self.register_buffer("start_ids", torch.tensor([self.tokenizer.index[w] for w in phrase_starts],
                                                        dtype=torch.int64), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        words, present = self.words(tokens), (tokens != 0)
        embedded = words + self.positions(positions)
        if self.phrase_starts:
            phrase = torch.isin(tokens, self.start_ids).cumsum(1)  # each token's phrase number in its prompt
            same = (phrase.unsqueeze(2) == phrase.unsqueeze(1)) & present.unsqueeze(1)  # [prompts, token, token]
            same = same.to(words.dtype)
            embedded = embedded + (same @ words) / same.sum(-1, keepdim=True).clamp_min(1)
        return embedded * present.unsqueeze(-1)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self(self.tokenizer(prompts).to(self.words.weight.device)).float().cpu()

    def save(self, checkpoint: Path) -> None:
        (checkpoint / "tokenizer").mkdir(parents=True, exist_ok=True)
        (checkpoint / "text_encoder").mkdir(parents=True, exist_ok=True)
        write_text_atomic(checkpoint / "tokenizer" / "vocab.json", json.dumps(self.tokenizer.vocabulary))
        config = {"model_type": MODEL_TYPE, "text_dim": self.words.embedding_dim,
                  "max_length": self.tokenizer.max_length, "phrase_starts": list(self.phrase_starts)}
        write_text_atomic(checkpoint / "text_encoder" / "config.json", json.dumps(config, indent=2))
        with atomic_path(checkpoint / "text_encoder" / "model.safetensors") as tmp:
            save_file({"words": self.words.weight.detach().float().cpu().contiguous(),
                       "positions": self.positions.weight.detach().float().cpu().contiguous()}, str(tmp))

    @classmethod
    def load(cls, checkpoint: Path) -> WordEncoder:
        try:
            vocabulary = json.loads((checkpoint / "tokenizer" / "vocab.json").read_text())
            config = json.loads((checkpoint / "text_encoder" / "config.json").read_text())
            tables = load_file(str(checkpoint / "text_encoder" / "model.safetensors"))
            encoder = cls(vocabulary, int(config["text_dim"]), int(config["max_length"]),
                          tuple(config.get("phrase_starts", ())))
            encoder.load_state_dict({"words.weight": tables["words"], "positions.weight": tables["positions"]})
        except (OSError, json.JSONDecodeError, KeyError, SafetensorError, RuntimeError, ValueError) as e:
            raise SaexportError(f"{checkpoint}: not a readable word-embedding text encoder ({e})") from None
        return encoder.eval()


def is_word_encoder(checkpoint: Path) -> bool:
    try:
        config = json.loads((checkpoint / "text_encoder" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("model_type") == MODEL_TYPE
