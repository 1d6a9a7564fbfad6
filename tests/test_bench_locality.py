"""bench/locality.py, run as a user runs it, on the demo model: the share of attention mass static masks keep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "locality.py"


def test_locality_bench_measures_held_out_mass_that_grows_with_the_mask(tmp_path):
    args = ["--model", "wan2.1-demo", "--device", "cpu", "--calib-prompts", "1", "--test-prompts", "1",
            "--seeds", "1", "--steps", "2", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "locality.json").read_text())
    assert set(record["per_head"]) == {"WEST", "local window", "radial"}
    for family, per_density in record["per_head"].items():
        shares = torch.tensor([per_density[d] for d in ("10%", "15%", "20%", "30%", "50%")])  # [D, layers, heads]
        assert shares.shape == (5, 6, 4) and bool(((shares > 0) & (shares <= 1 + 1e-9)).all()), family
        assert bool((shares.diff(dim=0) >= -1e-9).all()), family  # nested masks: a larger one never keeps less
        for name, row in record["mass_kept"][family].items():
            assert abs(row["blocks_kept"] - int(name[:-1]) / 100) < 0.03, (family, name)  # at its density
    for name, row in record["mass_kept"]["WEST"].items():  # WEST keeps the massive blocks: more than their share
        assert row["median"] > row["blocks_kept"], name
    assert (tmp_path / "locality_maps.png").stat().st_size > 0 and (tmp_path / "locality.md").exists()
