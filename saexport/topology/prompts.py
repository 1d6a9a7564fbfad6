"""The calibration set: which prompts WEST and FAST calibrate on, encoded how, and described how.

Prompts come from a file of embeddings (`--calib-embeddings`, e.g. UMT5 outputs), else from built-in prompts
encoded by the checkpoint's own text encoder (real-world scenes for UMT5; for the demo models, training captions
drawn with a seed of their own, never a held-out caption), else synthetic (said so). The unconditional pass
uses the empty prompt, as generation does. `describe()` is what the topology's metadata records, from file
contents (two clones of the same weights describe alike); `fingerprint()` is the cheap form a build's stage
key uses.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from saexport.errors import SaexportError
from saexport.models.presets import ModelPreset
from saexport.models.text_encoder import (
    encode_prompts,
    has_text_encoder,
    negative_embeddings,
    read_embeddings,
    synthetic_embeddings,
)
from saexport.models.word_encoder import is_word_encoder

CALIBRATION_SEED = 1_000_003  # the demo's calibration captions: a draw of its own, never a held-out caption
CHECK_SEED = 2_000_003  # the demo's quality-check captions: another draw of training captions
REPORT_SEED = 3_000_003  # the fidelity report's captions: the demo's held-out test captions
SYNTHETIC_SEED = 0
ROLES = ("calibration", "check", "report")  # what a prompt set is for: measured from, checked on, reported on

# A built-in calibration set: diverse subjects, motion, camera work, lighting and styles.
CALIBRATION_PROMPTS = [
    "A golden retriever runs across a sunny meadow, slow motion, shallow depth of field.",
    "Aerial drone shot over a coastline at sunset, waves breaking on dark rocks.",
    "A chef flips vegetables in a wok, flames rising, close-up, warm kitchen light.",
    "Time-lapse of clouds rolling over snowy mountain peaks.",
    "A neon-lit city street at night in the rain, people with umbrellas, reflections on the asphalt.",
    "An astronaut floats inside a space station, Earth visible through the window.",
    "A hummingbird hovers near a red flower, macro shot, wings blurred.",
    "Two dancers perform a contemporary routine on an empty stage, spotlight from above.",
    "A steam locomotive crosses a stone bridge in autumn, smoke trailing behind.",
    "Watercolor animation of a paper boat drifting down a stream.",
    "A cat knocks a glass off a kitchen table, handheld camera, comedic timing.",
    "Underwater footage of a coral reef with schools of tropical fish.",
    "A vintage car drives along a desert highway, dust clouds, wide shot.",
    "Close-up of hands kneading dough on a floured wooden board.",
    "A medieval knight in armor walks through a foggy forest.",
    "Fireworks explode over a harbor, boats silhouetted against the sky.",
    "A child blows dandelion seeds into the wind, backlit by the evening sun.",
    "3D render of a glass sphere rolling across a checkerboard floor.",
    "A surfer rides a large wave, camera following from the water.",
    "Snow falls on a quiet village street lit by lanterns.",
    "A panda eats bamboo in a zoo enclosure, static camera.",
    "Ink dropped into water, swirling clouds of blue and black, macro.",
    "A crowded train station at rush hour, people walking in all directions, top-down view.",
    "An old man plays chess in a park, camera slowly dollying in.",
]


# The built-in prompts' roles (UMT5): the calibration set from the first, the quality checks' and the report's after.
ROLE_SLICES = {"calibration": (0, 16), "check": (16, 20), "report": (20, 24)}


def builtin_prompts(preset: ModelPreset, weights: Path, count: int, role: str = "calibration") -> list[str]:
    """Prompts for `role`, disjoint across roles. Real-world scenes for UMT5 (`ROLE_SLICES` of the built-in list);
    for a demo model's word encoder, captions of its own videos: training captions, a draw of their own for
    calibration and for checks, and held-out test captions (never trained on) for a report."""
    if is_word_encoder(weights):
        from saexport.demo import captions

        seed = {"calibration": CALIBRATION_SEED, "check": CHECK_SEED, "report": REPORT_SEED}[role]
        return captions(preset.name, count, seed=seed, held_out=role == "report")
    start, end = ROLE_SLICES[role]
    if count > end - start:
        raise SaexportError(f"`prompts` for {role}: the built-in prompts hold {end - start}, asked for {count}; give "
                            "embeddings of your own prompts")
    return CALIBRATION_PROMPTS[start:start + count]


@functools.lru_cache(maxsize=8)
def _files_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of the files' names and bytes (UMT5-XXL's are ~11 GB: read once per command, keyed by the files'
    sizes and modification times)."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationSet:
    embeddings: torch.Tensor  # fp32 [prompts, text_len, text_dim]
    negative: torch.Tensor  # fp32 [1, text_len, text_dim], the unconditional pass's
    source: str  # what made them, as the topology records it


@dataclass(frozen=True)
class PromptSource:
    """Where the prompts of a `role` come from (see the module's docstring). The quality checks' and the report's
    prompts are never the calibration's: built-in prompts of their own role through the checkpoint's text encoder
    (also beside a calibration embeddings file), else synthetic ones of their own seed."""

    preset: ModelPreset
    count: int
    embeddings_file: Path | None = None
    weights: Path | None = None  # the checkpoint folder, whose text encoder may encode built-in prompts
    role: str = "calibration"

    @property
    def kind(self) -> str:
        if self.embeddings_file is not None and self.role == "calibration":
            return "file"
        return "text encoder" if self.weights is not None and has_text_encoder(self.weights) else "synthetic"

    @property
    def synthetic_seed(self) -> int:
        return SYNTHETIC_SEED + ROLES.index(self.role)

    def check(self) -> None:
        """Errors a user can fix, before any compute."""
        if self.count < 1 and self.embeddings_file is None:
            raise SaexportError(f"`prompts` must be at least 1, got {self.count}")
        if self.embeddings_file is not None and not self.embeddings_file.is_file():
            raise SaexportError(f"`embeddings_file` {self.embeddings_file} does not exist")

    def fingerprint(self) -> list:
        """Cheap to compute on every build: names, sizes and modification times."""
        files = self._files()
        return [self.kind, self.count, [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]

    def describe(self) -> str:
        """From the files' contents: the same for every copy of the same inputs."""
        if self.kind == "synthetic":
            return f"synthetic ({self.count} prompts, seed {self.synthetic_seed})"
        digest = _files_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self._files()))
        if self.kind == "file":
            return f"file {self.embeddings_file.name} (sha256 {digest})"  # type: ignore[union-attr]
        role = "" if self.role == "calibration" else f"{self.role} "
        return f"{self.count} built-in {role}prompts, text encoder sha256 {digest}"

    def load(self, cache: Path | None = None) -> CalibrationSet:
        self.check()
        text_len, text_dim = self.preset.text_len, self.preset.config["text_dim"]
        if self.kind == "file":
            embeddings = read_embeddings(self.embeddings_file, text_dim, text_len)  # type: ignore[arg-type]
        elif self.kind == "text encoder":
            prompts = builtin_prompts(self.preset, self.weights, self.count, self.role)  # type: ignore[arg-type]
            embeddings = encode_prompts(self.weights, prompts, cache, max_length=text_len)  # type: ignore[arg-type]
        else:
            embeddings = synthetic_embeddings(text_len, text_dim, self.count, self.synthetic_seed)
        negative_cache = cache.with_name(cache.stem + ".negative.safetensors") if cache is not None else None
        negative = negative_embeddings(self.weights, embeddings.shape[1], text_dim, negative_cache)
        return CalibrationSet(embeddings, negative, self.describe())

    def _files(self) -> list[Path]:
        if self.kind == "file":
            return [self.embeddings_file]  # type: ignore[list-item]
        if self.kind == "text encoder":
            return [f for folder in ("text_encoder", "tokenizer")
                    for f in sorted((self.weights / folder).iterdir()) if f.is_file()]  # type: ignore[operator]
        return []
