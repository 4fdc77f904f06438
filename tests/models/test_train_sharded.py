"""Data-parallel training (``TrainConfig.mesh``) equals one-device training (4 CPU devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def found(tiny_unet_dir) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sharded_training.py")), str(tiny_unet_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices(found):
    assert found["devices"] == 4


@pytest.mark.parametrize("mesh", ["data=4", "data=2"])
def test_data_parallel_steps_equal_the_one_device_steps(found, mesh):
    got = found[mesh]
    assert got["adapter"] <= TOL and got["opt_state"] <= TOL and got["losses"] <= TOL
    # not vacuous: two steps moved the adapter and the two losses differ
    assert found["moved"] > 1e-3 and len(set(found["losses"])) == 2


def test_the_step_splits_the_batch_and_all_reduces_gradients(found):
    assert found["batch_specs"] == ["('data',)"]
    assert found["batch_shard_rows"] == [1]  # global batch 4 over 4 devices
    assert found["out_replicated"]
    assert found["all_reduce"]


def test_a_batch_the_data_axis_does_not_divide_is_refused(found):
    assert found["indivisible"] == (
        "batch size 6 is not divisible by the mesh's data size 4 "
        "(every device takes batch_size / data items)"
    )
