"""Calibration along the sampler's loop, WEST threshold maps, FAST budgets, resolution transfer, stand-ins."""
