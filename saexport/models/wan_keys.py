"""Key mapping from the original Wan2.1 checkpoint layout to diffusers' `WanTransformer3DModel`.

Original checkpoints (github.com/Wan-Video/Wan2.1) name modules after the authors' code:
`blocks.N.self_attn.q`, `blocks.N.norm3` (the affine norm before cross-attention), `head.head`, ...
Diffusers swaps norm2/norm3 and nests the embedders; the table below is the whole difference.
"""

from __future__ import annotations

import re

# Prefix some exporters (ComfyUI, single-file checkpoints) put in front of every key.
STRIP_PREFIXES = ("model.diffusion_model.",)

# (pattern on the original key, replacement): first match wins. Patterns are anchored at the start.
_RULES: list[tuple[str, str]] = [
    (r"patch_embedding\.", "patch_embedding."),
    (r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"time_projection\.1\.", "condition_embedder.time_proj."),
    (r"head\.modulation$", "scale_shift_table"),
    (r"head\.head\.", "proj_out."),
    (r"blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.self_attn\.q\.", r"blocks.\1.attn1.to_q."),
    (r"blocks\.(\d+)\.self_attn\.k\.", r"blocks.\1.attn1.to_k."),
    (r"blocks\.(\d+)\.self_attn\.v\.", r"blocks.\1.attn1.to_v."),
    (r"blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"blocks\.(\d+)\.cross_attn\.q\.", r"blocks.\1.attn2.to_q."),
    (r"blocks\.(\d+)\.cross_attn\.k\.", r"blocks.\1.attn2.to_k."),
    (r"blocks\.(\d+)\.cross_attn\.v\.", r"blocks.\1.attn2.to_v."),
    (r"blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (r"blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def original_to_diffusers_key(key: str) -> str | None:
    """The diffusers name of an original Wan key, or None if the key has no counterpart."""
    for prefix in STRIP_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    for pattern, replacement in _COMPILED:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def original_config_to_diffusers(config: dict) -> dict:
    """Translate an original Wan `config.json` (dim, num_heads, ...) into diffusers config fields."""
    dim, num_heads = int(config["dim"]), int(config["num_heads"])
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    # What saexport does not run: say so rather than drop it (local attention, an image-to-video model).
    if tuple(config.get("window_size", (-1, -1))) != (-1, -1):
        raise ValueError(f"window_size {config['window_size']}: local attention windows are not supported")
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"model_type {config['model_type']!r}: saexport runs text-to-video (t2v) models")
    qk_norm = config.get("qk_norm", True)
    return {
        "patch_size": list(config.get("patch_size", [1, 2, 2])),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": int(config.get("in_dim", 16)),
        "out_channels": int(config.get("out_dim", 16)),
        "text_dim": int(config.get("text_dim", 4096)),
        "freq_dim": int(config.get("freq_dim", 256)),
        "ffn_dim": int(config["ffn_dim"]),
        "num_layers": int(config["num_layers"]),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if qk_norm else None,
        "eps": float(config.get("eps", 1e-6)),
        **({"_text_len": int(config["text_len"])} if "text_len" in config else {}),  # the text encoder's length
    }
