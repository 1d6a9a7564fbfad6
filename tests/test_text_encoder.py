"""Prompts through a checkpoint's own UMT5 (a small one written here in the diffusers layout)."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from saexport.cli import main
from saexport.models.presets import get_preset
from saexport.models.text_encoder import encode_prompts
from saexport.topology.prompts import CALIBRATION_PROMPTS, PromptSource

WORDS = sorted({w.strip(".,").lower() for p in CALIBRATION_PROMPTS for w in p.split()})


@pytest.fixture
def checkpoint(tiny, tmp_path):
    root = tmp_path / "ckpt"
    tiny.transformer.save_pretrained(root / "transformer")
    config = UMT5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                        relative_attention_num_buckets=8)
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    return root


def test_encoding_pads_with_zeros_and_is_cached(checkpoint, tmp_path):
    cache = tmp_path / "cache.safetensors"
    embeddings = encode_prompts(checkpoint, ["a cat", "a golden retriever runs across a sunny meadow"], cache,
                                max_length=16)
    assert embeddings.shape == (2, 16, 32)
    assert embeddings[0, 2:].abs().max() == 0 and embeddings[0, :2].abs().min() > 0  # two tokens, then padding
    assert embeddings[1, :8].abs().amin(-1).min() > 0 and embeddings[1, 8:].abs().max() == 0  # eight words
    stamp = cache.stat().st_mtime_ns
    assert torch.equal(encode_prompts(checkpoint, ["a cat", "a golden retriever runs across a sunny meadow"], cache,
                                      max_length=16), embeddings)
    assert cache.stat().st_mtime_ns == stamp  # served from the cache
    other = encode_prompts(checkpoint, ["a dog"], cache, max_length=16)
    assert other.shape == (1, 16, 32) and cache.stat().st_mtime_ns != stamp
    mine = tmp_path / "mine.safetensors"  # a user's file where the cache would go: used for nothing, kept
    save_file({"embeddings": torch.ones(1, 16, 32)}, str(mine))
    before = mine.read_bytes()
    assert torch.equal(encode_prompts(checkpoint, ["a dog"], mine, max_length=16), other)
    assert mine.read_bytes() == before


def test_topology_calibrates_on_the_built_in_prompts(checkpoint, tmp_path):
    result = CliRunner().invoke(main, [
        "topology", "--model", "wan2.1-tiny", "--weights", str(checkpoint), "--resolution", "64x64", "--frames", "9",
        "--block-size", "8",
        "--steps", "2", "--prompts", "3", "--rows-per-block", "4", "--device", "cpu",
        "--out", str(tmp_path / "out" / "topology.safetensors")])
    assert result.exit_code == 0, result.output
    assert "calibration prompts: 3 built-in prompts, text encoder sha256" in result.output
    assert (tmp_path / "out" / "calibration_embeddings.safetensors").exists()
    from saexport.artifacts import Topology

    calibration = Topology.load(tmp_path / "out" / "topology.safetensors").calibration
    assert calibration["embeddings"] == PromptSource(get_preset("wan2.1-tiny"), 3, None, checkpoint).describe()
    assert calibration["guidance"] == 5.0 and calibration["passes"] == ["cond", "uncond"]


def test_a_copy_of_the_same_encoder_describes_the_same_calibration(checkpoint, tmp_path):
    """Metadata from file contents, not modification times: two clones of a checkpoint give one topology hash."""
    import os
    import shutil

    copy = shutil.copytree(checkpoint, tmp_path / "clone")
    for file in (copy / "text_encoder").iterdir():
        os.utime(file, ns=(1, 1))
    preset = get_preset("wan2.1-tiny")
    original, cloned = PromptSource(preset, 3, None, checkpoint), PromptSource(preset, 3, None, copy)
    assert original.describe() == cloned.describe() and original.fingerprint() != cloned.fingerprint()
    assert PromptSource(preset, 4, None, checkpoint).describe() != original.describe()
