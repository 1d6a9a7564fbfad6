"""What FAST is asked for and how it allocates, each resolved once and checked here (docs/ARCHITECTURE.md, "The
method in one page"):

- `Goal`: what the budgets must achieve — a quality: the PSNR of the sparse video against the dense one on
  held-out calibration prompts, named by a fidelity preset (`high`, `medium`, `low`: 30 / 26 / 22 dB) or given in
  dB; or a mean density of the caller's choosing. The budgets file records its name;
- `BudgetRule`: how the budgets are allocated — v1, the lowest level reaching a graded 1 - Hellinger target; v2 (the
  default: docs/BENCHMARKS.md measured it 4.1-5.0 dB above v1 at 20, 30 and 45% density), per entry the level maximising
  w * Q - lambda * density, with the quality proxy Q measured along the sampler loop on `rows_per_head` rows a head,
  the weights w measured end to end (`sensitivity`, over `buckets` step buckets and every layer or `layer_groups`,
  on the first `sensitivity_prompts` calibration prompts: 1 + buckets + layers whole generations each, on a loop
  of `sensitivity_steps`, by default half of generation's) and `warmup` dense steps counted in the goal (or
  "auto").

Errors name the Python parameters; the command line maps them to its flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from saexport.artifacts import Budgets
from saexport.errors import SaexportError

FIDELITY_PSNR = {"high": 30.0, "medium": 26.0, "low": 22.0}  # fidelity preset -> dB against the dense video
FIDELITY_PRESETS = tuple(FIDELITY_PSNR)
DENSITY_GOALS = {"high": 0.45, "medium": 0.30, "low": 0.20}  # the presets' densities before they named a quality
PSNR_RANGE = (10.0, 60.0)  # dB: below, nothing recognisable is asked for; above, the dense video itself
RULES = ("v1", "v2")
PROXIES = ("hellinger", "output", "residual")
WARMUP_AUTO = "auto"


@dataclass(frozen=True)
class Goal:
    """What the budgets must achieve, named `name` in the budgets file: a `psnr` in dB against the dense video on
    held-out calibration prompts (the least attention work that meets it: `topology.quality_target`), or a
    `density`, the budget table's mean density (warm-up included). Exactly one is set."""

    name: str
    density: float | None = None
    psnr: float | None = None

    @classmethod
    def preset(cls, fidelity: str) -> Goal:
        if fidelity not in FIDELITY_PSNR:
            raise SaexportError(f"`fidelity` must be one of {', '.join(FIDELITY_PRESETS)}, got {fidelity!r}")
        return cls(fidelity, psnr=FIDELITY_PSNR[fidelity])

    @classmethod
    def of_density(cls, density: float) -> Goal:
        if not 0.0 < density <= 1.0:
            raise SaexportError(f"`density` must be in (0, 1], got {density}")
        return cls(f"density {density:g}", density=float(density))

    @classmethod
    def of_psnr(cls, psnr: float) -> Goal:
        low, high = PSNR_RANGE
        if not low <= psnr <= high:
            raise SaexportError(f"`target_psnr` must be within {low:g}..{high:g} dB, got {psnr:g}")
        return cls(f"psnr {psnr:g}", psnr=float(psnr))


@dataclass(frozen=True)
class Warmup:
    """Dense warm-up steps counted inside the goal (FAST v2): a number, or "auto" to choose among 0..`max_steps`
    (default a third of the steps) the count whose budgets score best by `judge` (higher is better; e.g. minus the
    final latent error, `topology.sensitivity.latent_error_judge`), else by the allocation's objective."""

    steps: int | str = 0
    max_steps: int | None = None
    judge: Callable[[Budgets], float] | None = None

    def __post_init__(self):
        if self.steps != WARMUP_AUTO and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                          or self.steps < 0):
            raise SaexportError(f"`warmup` must be a number of steps or {WARMUP_AUTO!r}, got {self.steps!r}")


@dataclass(frozen=True)
class BudgetRule:
    """How FAST allocates (the module's docstring). v1 reads none of v2's settings."""

    rule: str = "v2"
    proxy: str = "output"
    warmup: int | str = 0
    rows_per_head: int = 16
    sensitivity: bool = True
    buckets: int = 5
    sensitivity_prompts: int = 1
    sensitivity_steps: int | None = None  # the sensitivity's sampler loop (None: half of generation's)
    layer_groups: int | None = None  # the sensitivity's layer groups (None: every layer alone)

    def sensitivity_loop(self, steps: int) -> int:
        """The steps of the sensitivity's loop for a generation of `steps`: half of them by default, which ranked
        the cells as the whole loop does and lost no fidelity (bench/sensitivity_cost.py, docs/BENCHMARKS.md)."""
        return min(steps, self.sensitivity_steps or math.ceil(steps / 2))

    def __post_init__(self):
        if self.rule not in RULES:
            raise SaexportError(f"`rule` must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.proxy not in PROXIES:
            raise SaexportError(f"`proxy` must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        Warmup(self.warmup)  # checks it
        for name in ("rows_per_head", "buckets", "sensitivity_prompts", "sensitivity_steps", "layer_groups"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SaexportError(f"`{name}` must be at least 1, got {getattr(self, name)}")

    def key(self) -> dict:
        """What the allocation depends on: v1 reads none of v2's settings."""
        return asdict(self) if self.rule == "v2" else {"rule": "v1"}
