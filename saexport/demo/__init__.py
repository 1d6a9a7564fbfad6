"""The project's own trained models and the procedural captioned videos they learn from."""

from __future__ import annotations

import importlib

# The module that draws and renders each trained model's videos (`scenes(count, seed, held_out)`, `render`).
VIDEO_MODULES = {"wan2.1-demo": "saexport.demo.videos", "wan2.1-eval": "saexport.demo.objects",
                 "wan2.1-eval2": "saexport.demo.objects"}


def video_module(model: str):
    try:
        return importlib.import_module(VIDEO_MODULES[model])
    except KeyError:
        raise ValueError(f"{model} is not one of the models trained here ({', '.join(VIDEO_MODULES)})") from None


def captions(model: str, count: int, seed: int, held_out: bool = False) -> list[str]:
    """Captions of `count` training scenes (or held-out test scenes) of `model`'s videos, drawn from `seed`."""
    return [scene.caption() for scene in video_module(model).scenes(count, seed, held_out=held_out)]
