"""bench/caption_binding.py: the caption edits it measures, and a run as a user runs it (small, on the CPU)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from caption_binding import swapped, wrong  # noqa: E402

from saexport.demo import objects  # noqa: E402


def test_swaps_rebind_the_same_words_and_wrong_edits_change_every_object():
    rng = random.Random(0)
    scenes = [s for s in objects.scenes(200, seed=3, held_out=True)
              if len({o.shape for o in s.objects}) == len(s.objects)]
    for scene in scenes[:20]:
        moved = swapped(scene, "shape", rng)
        assert Counter(o.shape for o in moved.objects) == Counter(o.shape for o in scene.objects)
        assert all(a.shape != b.shape for a, b in zip(moved.objects, scene.objects, strict=True))
        assert [o.colour for o in moved.objects] == [o.colour for o in scene.objects]
        other = wrong(scene, "motion", [*objects.PANS, None], rng)
        assert all(a.motion != b.motion for a, b in zip(other.objects, scene.objects, strict=True))


def test_binding_bench_runs_and_finds_that_the_caption_matters(tmp_path):
    args = ["--model", "wan2.1-eval", "--device", "cpu", "--videos", "4", "--resolution", "16x16", "--out",
            str(tmp_path)]
    done = subprocess.run([sys.executable, str(BENCH / "caption_binding.py"), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "caption_binding.json").read_text())
    assert record["videos"] == 4 and set(record["binding_share"]) == {"shapes", "motions"}
    assert all(record["losses"]["as captioned"][sigma]["mean"] > 0 for sigma in ("0.5", "0.8", "0.95"))
    assert record["losses"]["empty"]["0.95"]["mean"] > 0  # the empty prompt predicts worse than the caption
    assert "| binding share |" in (tmp_path / "caption_binding.md").read_text()
