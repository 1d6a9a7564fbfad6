"""ONNX export of the sparse DiT and its verification in ONNX Runtime."""
