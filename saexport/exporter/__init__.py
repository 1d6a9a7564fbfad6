"""Sparse attention processors, token layout and ONNX export."""
