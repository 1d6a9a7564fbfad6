"""The Triton Inference Server model repository and the Python-backend models it ships."""
