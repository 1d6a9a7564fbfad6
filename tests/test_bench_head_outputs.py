"""bench/head_outputs.py: each head's share of its layer's attention output and how constant that output is over
tokens, split from the output projection; and the script run as a user runs it, on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from head_outputs import head_contributions, share_and_constancy, top_keys_cost  # noqa: E402

from saexport.models.checkpoint import load_model  # noqa: E402


def test_head_contributions_add_up_to_the_projection_and_follow_the_head_order():
    gen = torch.Generator().manual_seed(4)
    heads, head_dim, dim, tokens = 4, 8, 16, 50
    projection = torch.nn.Linear(heads * head_dim, dim).double()
    with torch.no_grad():
        projection.weight.copy_(torch.randn(dim, heads * head_dim, generator=gen, dtype=torch.float64))
        projection.bias.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
    attended = torch.randn(tokens, heads * head_dim, generator=gen, dtype=torch.float64)
    parts = head_contributions(attended, projection, heads)
    assert parts.shape == (heads, tokens, dim)
    torch.testing.assert_close(parts.sum(0) + projection.bias, projection(attended), rtol=1e-12, atol=1e-12)
    # Head 2 alone: zero every other head's slice of the input, and only its contribution survives.
    alone = torch.zeros_like(attended)
    alone[:, 2 * head_dim:3 * head_dim] = attended[:, 2 * head_dim:3 * head_dim]
    torch.testing.assert_close(projection(alone) - projection.bias, parts[2], rtol=1e-12, atol=1e-12)


def test_a_head_writing_one_vector_everywhere_is_constant_and_a_varying_one_is_not():
    gen = torch.Generator().manual_seed(5)
    tokens, dim = 4096, 32
    bias_like = torch.randn(1, dim, generator=gen).expand(tokens, dim)  # the same vector for every token
    varying = torch.randn(tokens, dim, generator=gen)  # zero-mean noise: its token mean is ~1/64 of its RMS
    louder = 3 * torch.randn(tokens, dim, generator=gen) + 3 * torch.randn(1, dim, generator=gen)  # half and half
    share, constancy = share_and_constancy(torch.stack([bias_like, varying, louder]))
    torch.testing.assert_close(constancy[0], torch.tensor(1.0, dtype=torch.float64))
    assert constancy[1] < 0.05 and 0.6 < constancy[2] < 0.8  # 1/sqrt(2) for equal constant and varying parts
    assert abs(float(share.sum()) - 1) < 1e-12
    rms = torch.tensor([bias_like.pow(2).mean().sqrt(), 1.0, 3 * 2**0.5], dtype=torch.float64)
    torch.testing.assert_close(share, rms / rms.sum(), rtol=0.05, atol=0)


def test_top_keys_cost_matches_a_row_by_row_count_and_its_limits():
    gen = torch.Generator().manual_seed(6)
    tokens, heads, head_dim, kept = 50, 3, 8, 0.3
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    rows = torch.tensor([0, 7, 49])
    mass, error = top_keys_cost(q, k, v, rows, kept)
    for h in range(heads):
        masses, errors = [], []
        for r in rows.tolist():
            p = torch.softmax(q[r, h] @ k[:, h].T / head_dim**0.5, dim=0)
            top = p.argsort(descending=True)[:15]  # 30% of 50 keys
            masses.append(p[top].sum())
            errors.append((p[top] / p[top].sum()) @ v[top, h] - p @ v[:, h])
        dense = torch.stack([torch.softmax(q[r, h] @ k[:, h].T / head_dim**0.5, 0) @ v[:, h] for r in rows.tolist()])
        torch.testing.assert_close(mass[h], torch.stack(masses).mean())
        torch.testing.assert_close(error[h], torch.stack(errors).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt())
    # Uniform attention (all scores tie): the top 30% hold 30% of the mass; a key that takes it all: no error.
    flat, _ = top_keys_cost(torch.zeros_like(q), k, v, rows, kept)
    torch.testing.assert_close(flat, torch.full((heads,), 0.3, dtype=torch.float64))
    peaked_q = k[:1].expand(tokens, -1, -1) * 50  # every row aligned with key 0, far above the rest
    mass, error = top_keys_cost(peaked_q, k, v, rows, kept)
    assert bool((mass > 0.999).all()) and bool((error < 1e-3).all())


def test_the_bench_runs_on_the_demo_model_and_joins_a_locality_record(tmp_path):
    weights_id = load_model("wan2.1-demo").weights_id
    west = [[0.3, 0.9, 0.3, 0.9]] * 6  # [layers, heads]: half of the heads diffuse
    locality = tmp_path / "locality.json"
    locality.write_text(json.dumps({"weights_id": weights_id, "per_head": {"WEST": {"30%": west}}}))
    args = ["--model", "wan2.1-demo", "--device", "cpu", "--captions", "1", "--noise-levels", "0.8,0.2",
            "--locality", str(locality), "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(BENCH / "head_outputs.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "head_outputs.json").read_text())
    # [noise levels, layers, heads]
    share, constancy, mass, error = (torch.tensor(record[k], dtype=torch.float64)
                                     for k in ("share", "constancy", "top_30_mass", "top_30_error"))
    assert share.shape == constancy.shape == mass.shape == error.shape == (2, 6, 4)
    assert bool(((mass >= 0.3 - 1e-6) & (mass <= 1)).all()) and bool((error >= 0).all())
    torch.testing.assert_close(share.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert bool(((constancy > 0) & (constancy <= 1)).all())
    assert record["groups"]["diffuse"]["count"] == record["groups"]["the rest"]["count"] == 12
    # Another model's locality record is refused, not joined.
    locality.write_text(json.dumps({"weights_id": "other", "per_head": {"WEST": {"30%": west}}}))
    done = subprocess.run([sys.executable, str(BENCH / "head_outputs.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "measured other weights" in done.stderr
