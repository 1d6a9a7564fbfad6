"""Python-backend models copied into a Triton repository as `model.py` (they run inside Triton only)."""
