"""Merges and sweeps keep their inputs' sharding and equal the unsharded results (4 CPU devices)."""

from __future__ import annotations

from pathlib import Path

import pytest
from device_script import run_json_script


@pytest.fixture(scope="module")
def found() -> dict:
    return run_json_script(Path(__file__).with_name("sharded_merges.py"))


def test_four_devices(found):
    assert found["devices"] == 4


@pytest.mark.parametrize(
    "case", ["merge-geodesic-none", "merge-geodesic-exact", "merge-cayley-cayley"]
)
def test_eager_merge_keeps_its_layout_bit_for_bit(found, case):
    assert found[case]["diff"] == 0.0
    assert found[case]["specs"] == ["('a', 'b', None, None)"]


def test_eager_sweep_keeps_its_layout_bit_for_bit(found):
    assert found["sweep"]["diff"] == 0.0
    assert found["sweep"]["specs"] == ["(None, 'a', 'b', None, None)"]


def test_sweep_with_its_t_axis_split(found):
    assert found["sweep-t-split"]["diff"] <= 1e-6
    assert found["sweep-t-split"]["specs"] == ["('b', 'a', None, None, None)"]


def test_jit_under_an_explicit_mesh_gathers_nothing(found):
    got = found["jit-explicit"]
    assert got["diff"] == 0.0
    assert got["specs"] == ["(None, 'd', None, None)"]
    assert "all-gather" not in got["hlo"] and "all-to-all" not in got["hlo"]


def test_jit_without_a_mesh_runs_on_sharded_inputs(found):
    assert found["jit-auto"]["diff"] == 0.0
