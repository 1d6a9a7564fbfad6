"""Wan2.1 presets, checkpoint loading and key mapping."""
