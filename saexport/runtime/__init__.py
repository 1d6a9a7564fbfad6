"""The runtime: the one sampler loop, its schedule, the Denoiser back ends, generation and video output, and
(`parallel/`) one video on several ranks."""
