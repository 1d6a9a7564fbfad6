"""objects.py's scenes, captions and held-out split, drawn with detail at several scales whose every texture is a
generic band-limited field (`objects.INCOHERENT`): `wan2.1-eval2`'s videos. The same scene has the same caption;
only its pixels differ."""

from __future__ import annotations

from functools import partial

from saexport.demo import objects
from saexport.demo.objects import MAX_WORDS, VOCABULARY, Scene, is_held_out, scenes

__all__ = ["MAX_WORDS", "VOCABULARY", "Scene", "is_held_out", "render", "scenes"]

render = partial(objects.render, look=objects.INCOHERENT)
