from dataclasses import replace

import pytest
import torch

from saexport.artifacts import BlockedGrid, Budgets, ModelIdentity, Topology
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.topology.standin import standin_budgets, standin_topology


def make_topology(seed=0):
    return standin_topology(ModelIdentity("wan2.1-tiny", "cfg", "w"), 2, 4,
                            BlockedGrid((3, 4, 4), 8, parse_layout("tile3d:1x2x4")), seed)


def test_roundtrip_and_hashes(tmp_path):
    topology = make_topology()
    budgets = standin_budgets(topology, steps=5)
    topology.save(tmp_path / "topology.safetensors")
    budgets.save(tmp_path / "budgets.safetensors")
    t2, b2 = Topology.load(tmp_path / "topology.safetensors"), Budgets.load(tmp_path / "budgets.safetensors")
    assert torch.equal(t2.levels, topology.levels) and t2.grid == (3, 4, 4) and t2.layout == topology.layout
    assert t2.hash() == topology.hash() and b2.hash() == budgets.hash()
    b2.check_matches(t2, steps=5)
    with pytest.raises(SaexportError, match="for 5 denoising steps, not 50"):
        b2.check_matches(t2, steps=50)


def test_same_inputs_give_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        topology = make_topology(seed=3)
        topology.save(tmp_path / f"{name}.safetensors")
        standin_budgets(topology, 4).save(tmp_path / f"{name}-budgets.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a-budgets.safetensors").read_bytes() == (tmp_path / "b-budgets.safetensors").read_bytes()


def test_model_weights_and_grid_mismatch_are_named(tmp_path):
    topology = make_topology()
    ours = topology.made_for
    with pytest.raises(SaexportError, match="built for model wan2.1-tiny"):
        topology.check_matches(replace(ours, model="wan2.1"), (3, 4, 4))
    with pytest.raises(SaexportError, match="token grid"):
        topology.check_matches(ours, (5, 4, 4))
    with pytest.raises(SaexportError, match="made from weights"):
        topology.check_matches(replace(ours, weights_id="other"))
    topology.check_matches(ours, (3, 4, 4))
    topology.check_matches(ours)  # no grid given: only the model and weights


def test_corrupt_wrong_kind_and_old_version(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SaexportError, match="not a readable topology file"):
        Topology.load(bad)
    topology = make_topology()
    topology.save(tmp_path / "t.safetensors")
    with pytest.raises(SaexportError, match="is not a budgets file"):
        Budgets.load(tmp_path / "t.safetensors")
    with pytest.raises(SaexportError, match="does not exist"):
        Topology.load(tmp_path / "missing.safetensors")


def test_failed_write_leaves_previous_file(tmp_path):
    topology = make_topology()
    path = tmp_path / "topology.safetensors"
    topology.save(path)
    before = path.read_bytes()
    broken = make_topology()
    broken.levels = broken.levels.float()  # not uint8: the save fails after the temporary file exists
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["topology.safetensors"]
