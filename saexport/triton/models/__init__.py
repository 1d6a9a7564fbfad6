"""The repository's Python-backend models, copied into a Triton repository as `model.py` (they run inside Triton
only), and `backend.py`, what they share there (requests in, responses and BLS out). Their work is in
`saexport.triton.serving`, which runs without Triton."""
