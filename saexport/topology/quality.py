"""Quality proxies Q[step, layer, head, level] for FAST v2 (`topology.allocation`), measured along the calibration
loop as `fast.compute_hellinger_quality` measures v1's; higher is better.

A few query rows are sampled per head (`HeadRows`, 16 by default: the method's recipe) and probed during every
measured pass (`models.processors.RowProbe`): for each row i and key block b, its softmax mass m_b and its partial
output P_b = sum_{j in b} p_j v_j. At level P the kernel attends the blocks with level(u_i, b) <= P and renormalises,
so the row's sparse output is o_P = sum_kept P_b / sum_kept m_b (zeros when nothing is kept) and its dense output
o = sum_b P_b / sum_b m_b: scattering P_b and m_b into a histogram over levels and cumulating it gives every
level at once (as `fast.hellinger_curves` does for the kept mass).

- `hellinger`: 1 - Hellinger(dense row, sparse row), averaged over the rows (FAST v1's quality, on these rows);
- `output`: 1 - ||O_P - O|| / ||O||, the relative error of the head's attention output over the sampled rows
  (norms over rows and channels, so rows of small output do not dominate);
- `residual`: 1 - ||g * W_h (O_P - O)|| / ||X||: the change that head h's sparsity makes to the residual stream
  (gated output projection W_h of the head's slice, gate g = the block's gate_msa), relative to the residual
  stream X entering the block at the sampled rows. Comparable across layers and heads: it weighs each head by its
  output projection and each layer by its gate and stream. It costs a [head_dim, head_dim] quadratic form per level
  and row (through W_h^T diag(g^2) W_h), a few times the `output` proxy's arithmetic.

Each is averaged over the batch, then over the runs (passes) of each step.
"""

from __future__ import annotations

import torch

from saexport.artifacts import Topology
from saexport.errors import SaexportError
from saexport.models.processors import RowProbe
from saexport.topology.calibration import CalibrationCheckpoint, Calibrator, HeadRows, Run, calibration_key
from saexport.topology.fast import LEVELS, QualityTable, hellinger_curves
from saexport.topology.goals import PROXIES

ROWS_PER_HEAD = 16


def _cumulated(probe: RowProbe, row_levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse outputs at every level `[B, H, R, 256, D]`, dense outputs `[B, H, R, D]` (float64) and the kept
    mass `[B, H, R, 256]`, from a probe and the rows' levels `[H, R, n]`."""
    masses, partials = probe.masses.double(), probe.partials.double()
    batch, heads, rows, n, dim = partials.shape
    index = row_levels.long().to(masses.device).unsqueeze(0).expand(batch, -1, -1, -1)
    kept_mass = torch.zeros(batch, heads, rows, LEVELS, dtype=torch.float64, device=masses.device)
    kept_mass.scatter_add_(-1, index, masses)
    kept_out = torch.zeros(batch, heads, rows, LEVELS, dim, dtype=torch.float64, device=masses.device)
    kept_out.scatter_add_(3, index.unsqueeze(-1).expand(-1, -1, -1, -1, dim), partials)
    kept_mass, kept_out = kept_mass.cumsum(-1), kept_out.cumsum(3)
    sparse = torch.where(kept_mass[..., None] > 0, kept_out / kept_mass[..., None].clamp(min=1e-300), 0.0)
    dense = kept_out[..., -1, :] / kept_mass[..., -1:]
    return sparse, dense, kept_mass


def output_error_curves(probe: RowProbe, row_levels: torch.Tensor, cumulated=None) -> torch.Tensor:
    """Relative error ||O_P - O|| / ||O|| of each head's output over its sampled rows at every level:
    `[H, 256]`, averaged over the batch. (`cumulated`: `_cumulated(probe, row_levels)` if already computed.)"""
    sparse, dense, _ = cumulated or _cumulated(probe, row_levels)
    error = (sparse - dense.unsqueeze(3)).square().sum(dim=(2, 4))  # [B, H, 256]
    scale = dense.square().sum(dim=(2, 3)).clamp(min=1e-300)  # [B, H]
    return (error / scale.unsqueeze(-1)).sqrt().mean(0).cpu()


def residual_error_curves(probe: RowProbe, row_levels: torch.Tensor, cumulated=None) -> torch.Tensor:
    """||g * W_h (O_P - O)|| / ||X|| over each head's sampled rows at every level: `[H, 256]`, batch mean."""
    if probe.stream is None or probe.gate is None:
        raise SaexportError("the residual proxy needs the probe's residual stream and gate (HeadRows(residual=True))")
    sparse, dense, _ = cumulated or _cumulated(probe, row_levels)
    delta = sparse - dense.unsqueeze(3)  # [B, H, R, 256, D]
    batch, heads, _, _, dim = delta.shape
    weight = probe.out_weight.double().to(delta.device).view(-1, heads, dim)  # [model dim, H, D]
    gate2 = probe.gate.double().to(delta.device).square()  # [B, model dim]
    gram = torch.einsum("ihd,bi,ihe->bhde", weight, gate2, weight)  # W_h^T diag(g^2) W_h, [B, H, D, D]
    error = torch.einsum("bhrpd,bhde,bhrpe->bhp", delta, gram, delta).clamp(min=0)  # [B, H, 256]
    scale = probe.stream.double().to(delta.device).square().sum(dim=(2, 3)).clamp(min=1e-300)  # [B, H]
    return (error / scale.unsqueeze(-1)).sqrt().mean(0).cpu()


def quality_curves(proxies: tuple[str, ...], probe: RowProbe, row_levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q `[H, 256]` (higher is better) of each proxy for one layer and run."""
    cumulated = _cumulated(probe, row_levels) if {"output", "residual"} & set(proxies) else None
    curves = {}
    for proxy in proxies:
        if proxy == "hellinger":
            curves[proxy] = hellinger_curves(probe.masses, row_levels)
        elif proxy == "output":
            curves[proxy] = 1 - output_error_curves(probe, row_levels, cumulated)
        elif proxy == "residual":
            curves[proxy] = 1 - residual_error_curves(probe, row_levels, cumulated)
        else:
            raise SaexportError(f"`proxy` must be one of {', '.join(PROXIES)}, got {proxy!r}")
    return curves


class ProxyTables:
    """A `QualityTable` per proxy, accumulated and merged together (`calibration.Accumulator`)."""

    def __init__(self, tables: dict[str, QualityTable]):
        self.tables = tables

    def empty(self) -> ProxyTables:
        return ProxyTables({proxy: table.empty() for proxy, table in self.tables.items()})

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{proxy}.{name}": tensor for proxy, table in self.tables.items()
                for name, tensor in table.state().items()}

    def merge(self, trajectory: dict[str, torch.Tensor]) -> None:
        for proxy, table in self.tables.items():
            table.merge({name: trajectory[f"{proxy}.{name}"] for name in table.state()})


def compute_quality(calibrator: Calibrator, topology: Topology, proxies: tuple[str, ...] = PROXIES,
                    rows_per_head: int = ROWS_PER_HEAD, seed: int = 2) -> dict[str, torch.Tensor]:
    """Each proxy's Q `[steps, layers, heads, 256]` for every level of `topology`, along the dense sampler loop:
    one walk measures them all. An interrupted measurement resumes from the calibrator's progress file."""
    unknown = [proxy for proxy in proxies if proxy not in PROXIES]
    if unknown or not proxies:
        raise SaexportError(f"quality proxies must be among {', '.join(PROXIES)}, got {list(proxies)}")
    blocks, loop = topology.blocks, calibrator.loop
    layers, heads = topology.levels.shape[:2]
    rows = HeadRows.draw(blocks.seq_len, heads, blocks.block_size, rows_per_head, seed,
                         residual="residual" in proxies)
    # levels of each sampled row's query block: [layers, heads, R, n]
    row_levels = topology.levels[:, torch.arange(heads).view(-1, 1), rows.block]
    tables = ProxyTables({proxy: QualityTable(loop.steps, layers, heads) for proxy in proxies})

    def on_rows(trajectory: ProxyTables, run: Run, layer: int, probe: RowProbe) -> None:
        for proxy, curves in quality_curves(tuple(proxies), probe, row_levels[layer]).items():
            trajectory.tables[proxy].add(run.step, layer, curves)

    key = calibration_key("FAST quality", topology.hash(), calibrator.loaded.weights_id, calibrator.prompts.embeddings,
                          calibrator.prompts.negative, loop.settings(), list(proxies), rows_per_head, seed)
    checkpoint = CalibrationCheckpoint(calibrator.progress_path(), key, tables.state())
    calibrator.measure(blocks, rows, tables, on_rows, "FAST quality", checkpoint)
    checkpoint.remove()
    return {proxy: table.mean() for proxy, table in tables.tables.items()}
