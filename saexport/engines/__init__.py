"""Engine building, runtime back ends, sampler and Triton repository."""
