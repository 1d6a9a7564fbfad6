"""Loading real checkpoint layouts, written here exactly as diffusers and the original Wan code write them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from saexport.errors import SaexportError
from saexport.models.checkpoint import load_model

# diffusers name -> original Wan name, written out by hand (independent of saexport's own mapping).
ORIGINAL_NAMES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
BLOCK_NAMES = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def original_key(name: str) -> str:
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        module, _, param = rest.rpartition(".") if rest != "scale_shift_table" else (rest, "", "")
        mapped = BLOCK_NAMES[module]
        return f"blocks.{index}.{mapped}" + (f".{param}" if param else "")
    module, _, param = name.rpartition(".") if name != "scale_shift_table" else (name, "", "")
    return ORIGINAL_NAMES[module] + (f".{param}" if param else "")


def write_original(folder, state, config, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    c = config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
        "dim": c.num_attention_heads * c.attention_head_dim, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
        "in_dim": c.in_channels, "out_dim": c.out_channels, "text_dim": c.text_dim,
        "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "eps": c.eps, "text_len": 8,
    }))
    save_file({prefix + original_key(k): v.contiguous() for k, v in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(loaded, state):
    got = loaded.transformer.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_diffusers_layout_single_and_sharded(tiny, tmp_path, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    tiny.transformer.save_pretrained(tmp_path / "transformer", **kwargs)
    if shard:
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = load_model("wan2.1-tiny", tmp_path)
    assert_same_weights(loaded, tiny.transformer.state_dict())
    assert not loaded.random_weights and len(loaded.weights_id) == 64


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_layout_is_mapped(tiny, tmp_path, prefix):
    state = tiny.transformer.state_dict()
    write_original(tmp_path, state, tiny.transformer.config, prefix)
    assert_same_weights(load_model("wan2.1-tiny", tmp_path), state)


def test_the_same_tensors_are_the_same_weights_in_any_layout_or_sharding(tiny, tmp_path):
    """Artifacts name the weights they were calibrated on by this id (what `check_matches` compares): the same
    tensors give the same id in the other layout or another sharding, other tensors another id."""
    state = tiny.transformer.state_dict()
    tiny.transformer.save_pretrained(tmp_path / "whole" / "transformer")
    tiny.transformer.save_pretrained(tmp_path / "sharded" / "transformer", max_shard_size="20KB")
    write_original(tmp_path / "original", state, tiny.transformer.config, "model.diffusion_model.")
    ids = {name: load_model("wan2.1-tiny", tmp_path / name).weights_id for name in ("whole", "sharded", "original")}
    assert len(set(ids.values())) == 1, ids
    changed = dict(state)
    changed["blocks.0.attn1.to_q.weight"] = changed["blocks.0.attn1.to_q.weight"] + 1e-3
    write_original(tmp_path / "other", changed, tiny.transformer.config)
    assert load_model("wan2.1-tiny", tmp_path / "other").weights_id != ids["whole"]


def test_bf16_load_keeps_fp32_modules(tiny, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    model = load_model("wan2.1-tiny", tmp_path, dtype=torch.bfloat16).transformer
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def test_no_such_path(tmp_path):
    with pytest.raises(SaexportError, match="does not exist"):
        load_model("wan2.1-tiny", tmp_path / "nope")


def test_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(SaexportError, match="neither a diffusers"):
        load_model("wan2.1-tiny", tmp_path)


def test_checkpoint_of_another_model(tiny, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    with pytest.raises(SaexportError, match="not a wan2.1 checkpoint.*num_layers: checkpoint has 2, wan2.1 has 30"):
        load_model("wan2.1", tmp_path)


def test_missing_and_unexpected_keys(tiny, tmp_path):
    state = dict(tiny.transformer.state_dict())
    del state["blocks.1.attn1.to_q.weight"]
    state["blocks.1.attn1.extra"] = torch.randn(3)
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    save_file({k: v.contiguous() for k, v in state.items()},
              str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SaexportError, match=r"missing keys \(1\): blocks.1.attn1.to_q.weight; "
                                            r"unexpected keys \(1\): blocks.1.attn1.extra"):
        load_model("wan2.1-tiny", tmp_path)


def test_unknown_original_key(tiny, tmp_path):
    state = dict(tiny.transformer.state_dict())
    write_original(tmp_path, state, tiny.transformer.config)
    extra = {original_key(k): v.contiguous() for k, v in state.items()}
    extra["img_emb.proj.0.weight"] = torch.randn(2)
    save_file(extra, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SaexportError, match="unexpected keys in the original Wan checkpoint.*img_emb"):
        load_model("wan2.1-tiny", tmp_path)


def test_shape_mismatch(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.transformer.state_dict().items()}
    state["proj_out.bias"] = torch.randn(5)
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    save_file(state, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SaexportError, match=r"shape mismatch.*proj_out.bias: checkpoint \(5,\), model \(64,\)"):
        load_model("wan2.1-tiny", tmp_path)


def test_corrupt_file(tiny, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SaexportError, match="is not a readable safetensors file"):
        load_model("wan2.1-tiny", tmp_path)


def test_missing_shard(tiny, tmp_path):
    tiny.transformer.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    next((tmp_path / "transformer").glob("diffusion_pytorch_model-00002-*.safetensors")).unlink()
    with pytest.raises(SaexportError, match="names shards that are missing"):
        load_model("wan2.1-tiny", tmp_path)


def test_weights_and_random_are_exclusive(tmp_path):
    with pytest.raises(SaexportError, match="not both"):
        load_model("wan2.1-tiny", tmp_path, random_weights=True)
    with pytest.raises(SaexportError, match="needs `weights`"):
        load_model("wan2.1-tiny")


@pytest.mark.parametrize("change, message", [
    (lambda config: [config], "is not a JSON object of config fields"),
    (lambda config: {**config, "frobnicate": 3}, "unknown config field 'frobnicate'"),
    (lambda config: {**config, "rope_max_seq_len": "long"}, "config field 'rope_max_seq_len' must be int, got 'long'"),
])
def test_a_diffusers_config_of_the_wrong_form_is_named(tiny, tmp_path, change, message):
    tiny.transformer.save_pretrained(tmp_path / "transformer")
    path = tmp_path / "transformer" / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(SaexportError, match=message):
        load_model("wan2.1-tiny", tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("window_size", [128, 128], "local attention windows are not supported"),
    ("model_type", "i2v", "saexport runs text-to-video"),
    ("text_len", 512, "text_len is 512, wan2.1-tiny encodes prompts to 8 tokens"),
])
def test_an_original_config_saexport_would_run_wrongly_is_refused(tiny, tmp_path, field, value, message):
    write_original(tmp_path, tiny.transformer.state_dict(), tiny.transformer.config)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(SaexportError, match=message):
        load_model("wan2.1-tiny", tmp_path)
