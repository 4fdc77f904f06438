"""Data-parallel generation over 4 forced CPU devices equals one image per call on one device."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from device_script import run_json_script

from orthofuse_jax.models.mesh import MeshSpecError, data_devices


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded_reference")


@pytest.fixture(scope="module")
def found(tiny_model_dir, reference_dir) -> dict:
    return run_json_script(
        Path(__file__).with_name("sharded_generate.py"),
        str(tiny_model_dir),
        str(reference_dir),
        timeout=600,
    )


def test_four_devices(found):
    assert found["devices"] == 4


@pytest.mark.parametrize("case", ["d4-n4", "d4-n6"])
def test_each_image_equals_its_own_one_device_run(found, case):
    """Image i starts from seed + i whatever N and D; N = 6 on 4 devices is padded to 8."""
    got = found[case]
    n = int(case.split("-n")[1])
    assert got["shape"] == [n, 64, 64, 3]
    assert got["latents"] <= 1e-5 and got["per_image"] <= 1e-5
    assert got["uint8"] <= 1


def test_one_step_program_gathers_nothing(found):
    """One SPMD program over 4 partitions, compiled once, latents stay split, no collective."""
    step = found["step"]
    assert step["collectives"] == []
    assert step["partitions"] and step["programs"] == 1
    assert step["out_spec"] == ["data"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=5", r"'data=5'.*4 local device"),
        ("data=0", r"'data=0'.*size 0"),
        ("data=-2", r"'data=-2'"),
        ("data=two", r"'data=two'.*AXIS=SIZE"),
        ("model=2", r"'model=2'.*one axis"),
        ("4", r"'4'.*AXIS=SIZE"),
        (0, r"1 <= D"),
    ],
)
def test_bad_mesh_requests_are_named(spec, match):
    with pytest.raises(MeshSpecError, match=match):
        data_devices(spec, 4)


def test_mesh_requests():
    assert data_devices(None, 4) == 4
    assert data_devices("data=3", 4) == 3
    assert data_devices(" data = 2", 4) == 2
    assert data_devices(1, 4) == 1


def test_cli_writes_one_png_per_image(found, reference_dir, tiny_model_dir, tmp_path):
    """``--num-images 3``: OUT-0/1/2.png, image i from seed 3 + i, as the one-image Euler loop."""
    from PIL import Image

    from orthofuse_jax.cli import main

    with np.load(reference_dir / "reference.npz") as f:
        ref = f["images"]
        np.savez(tmp_path / "emb.npz", prompt_embeds=f["prompt_embeds"], pooled=f["pooled"])
    args = ["generate", "--model", str(tiny_model_dir), "--embeddings", str(tmp_path / "emb.npz")]
    args += ["--steps", "2", "--height", "64", "--width", "64", "--seed", "3", "--no-progress"]
    rc = main([*args, "--num-images", "3", "--mesh", "data=1", "-o", str(tmp_path / "out.png")])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out-0.png", "out-1.png", "out-2.png"]
    for i in range(3):
        img = Image.open(tmp_path / f"out-{i}.png")
        assert f"seed={3 + i} " in img.text["orthofuse-jax"]
        assert np.abs(np.asarray(img).astype(int) - ref[i]).max() <= 1


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--mesh", "data=2"], r"'data=2'.*1 local device"),
        (["--mesh", "batch=1"], r"'batch=1'.*one axis"),
        (["--num-images", "0"], r"--num-images must be >= 1, got 0"),
    ],
)
def test_cli_bad_mesh_or_count_exits_2(extra, match, tmp_path, capsys):
    from orthofuse_jax.cli import main

    out = tmp_path / "o.png"
    args = ["generate", "--model", str(tmp_path), "--embeddings", "e.npz", "-o", str(out)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("orthofuse-jax generate: error: ")
    assert re.search(match, err[0])
    assert not list(tmp_path.iterdir())


def test_denoise_refuses_bad_image_counts(flax_unet):
    from orthofuse_jax.models import denoise

    unet, params, _ = flax_unet
    kw = dict(height=64, width=64, num_steps=1, progress=False)
    emb = (np.zeros((5, 48), np.float32), np.zeros(32, np.float32))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"num_images .*got {bad!r}"):
            denoise(unet, params, *emb, num_images=bad, **kw)
    noise = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(
        ValueError, match=r"latents have shape \(2, 4, 8, 8\), expected \(3, 4, 8, 8\)"
    ):
        denoise(unet, params, *emb, latents=noise, num_images=3, **kw)
