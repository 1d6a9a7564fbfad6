"""saexport: Wan2.1 with ScalingAttention block-sparse attention, exported for production."""

__version__ = "0.1.0"
