"""Wan2.1 presets, checkpoints and key mapping, text encoders, and the DiT as saexport runs it (dense, sparse or
probed: the attention op and its ONNX schema, the processors, the static-grid model)."""
