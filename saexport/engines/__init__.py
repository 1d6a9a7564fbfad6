"""TensorRT engine building from the exported ONNX, with the BlockSparseAttention plugin."""
