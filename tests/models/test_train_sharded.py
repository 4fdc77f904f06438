"""Data-parallel training (``TrainConfig.mesh``) equals one-device training (4 CPU devices)."""

from __future__ import annotations

from pathlib import Path

import pytest
from device_script import run_json_script

TOL = 1e-5


@pytest.fixture(scope="module")
def found(tiny_unet_dir, tmp_path_factory) -> dict:
    return run_json_script(
        Path(__file__).with_name("sharded_training.py"),
        str(tiny_unet_dir),
        str(tmp_path_factory.mktemp("dp")),
    )


def test_four_devices(found):
    assert found["devices"] == 4


@pytest.mark.parametrize("run", ["data=4", "resume data=4 -> data=2"])
def test_data_parallel_steps_equal_the_one_device_steps(found, run):
    """Two steps on data=4, and step 1 on data=4 saved and resumed on data=2 for step 2."""
    got = found[run]
    assert got["adapter"] <= TOL and got["opt_state"] <= TOL and got["losses"] <= TOL
    assert got["key"] and got["data_rng"]
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


def test_train_cli_mesh_equals_the_one_device_run(found):
    got = found["cli"]
    assert got["rc"] == 0 and got["adapter"] <= TOL and got["losses"] <= TOL


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--mesh", "data=2", "--batch-size", "3"],
            "--batch-size 3 is not divisible by --mesh data=2 (every device takes batch-size / D items)",
        ),
        (["--mesh", "data=64", "--batch-size", "64"], "mesh data=64 needs 64 devices, 1 available"),
        (["--mesh", "data"], "mesh 'data': entry 'data' is not AXIS=SIZE (e.g. data=4)"),
        (
            ["--mesh", "model=1"],
            "--mesh 'model=1': training splits batches over a 'data' axis (data=D)",
        ),
    ],
)
def test_train_cli_refuses_a_bad_mesh(flags, message, tmp_path, capsys):
    """One line, exit 2, before any data or weights are read (the paths here do not exist)."""
    from orthofuse_jax.cli import main

    out = tmp_path / "a.safetensors"
    argv = ["train", "--model", str(tmp_path / "none"), "--latents", str(tmp_path / "x.npz")]
    assert main(argv + flags + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"orthofuse-jax train: error: {message}"
    assert not out.exists()
