import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run (torch's default seed is fixed); pytest shows the seed on failure.
    print(f"torch seed {torch.seed()}")


@pytest.fixture
def tiny():
    from saexport.models.checkpoint import load_model  # not at import: GPU-only runs lack diffusers

    return load_model("wan2.1-tiny", random_weights=True, seed=torch.randint(0, 2**31, ()).item())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got - want).norm() / want.norm())
