"""``orthofuse-jax fuse --to peft`` and ``inspect`` on PEFT OFT folders made by the real ``peft``
package; every bad input: exit status 2, one error line, no output left behind, inputs unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orthofuse_jax.cli import main

from .test_peft_write import X, folded_outputs, geodesic, make_adapter, peft_outputs, rotations


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("peftcli")
    return (
        make_adapter(d / "concept", 1, oft_block_size=3),
        make_adapter(d / "style", 2, oft_block_size=3),
    )


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def digest(paths):
    """Hash of every file under ``paths`` (to show inputs are unchanged)."""
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def assert_bad(capsys, folder, inputs, argv, *needles):
    """Exit 2, one error line holding ``needles``, nothing new in ``folder``, inputs unchanged."""
    before, files = digest(inputs), listing(folder)
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for n in needles:
        assert str(n) in errors[0], errors[0]
    assert digest(inputs) == before
    assert listing(folder) == files
    return errors[0]


def write_reference(path, shapes, seed):
    """A reference-format GS file (L != I) with the given ``{layer: (nb, b)}``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    t = {}
    for name, (nb, b) in shapes.items():
        for side in "LR":
            g = 0.3 * rng.standard_normal((nb, b, b))
            t[f"{name}.ort_monarch.{side}"] = (0.5 * (g - np.swapaxes(g, -1, -2))).astype(
                np.float32
            )
    save_file(t, str(path), metadata={"format": "pt"})
    return path


def test_fuse_writes_a_peft_folder_by_default(capsys, pair, tmp_path):
    out = tmp_path / "fused"
    rc, stdout, err = run(capsys, "fuse", *pair, "-o", out, "--t", "0.5", "--restore", "none")
    assert rc == 0, err
    assert "PEFT OFT" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    u1, u2 = rotations(pair[0]), rotations(pair[1])
    blocks = {n: geodesic(u1[n], u2[n], 0.5) for n in u1}
    np.testing.assert_allclose(peft_outputs(out, X), folded_outputs(blocks, X), atol=2e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # no temp folder left


def test_fuse_t0_is_the_concept(capsys, pair, tmp_path):
    out = tmp_path / "fused"
    rc, _, err = run(capsys, "fuse", *pair, "-o", out, "--t", "0", "--restore", "exact")
    assert rc == 0, err
    np.testing.assert_allclose(peft_outputs(out, X), peft_outputs(pair[0], X), atol=2e-6)


def test_fuse_to_reference_writes_a_file(capsys, pair, tmp_path):
    from orthofuse_jax.fusion.io import adapter_format

    out = tmp_path / "fused.safetensors"
    rc, _, err = run(capsys, "fuse", *pair, "-o", out, "--to", "reference")
    assert rc == 0, err
    assert out.is_file() and adapter_format(out) == "reference"


def test_inspect_names_the_format(capsys, pair, tmp_path):
    rc, out, _ = run(capsys, "inspect", pair[0])
    assert rc == 0
    assert "format: peft (PEFT OFT v0.16+)" in out
    ref = write_reference(tmp_path / "ref.safetensors", {"a": (4, 3), "b": (2, 3)}, 0)
    rc, out, _ = run(capsys, "inspect", ref)
    assert rc == 0
    assert "format: reference" in out


def test_default_falls_back_to_reference_for_a_reference_style(capsys, pair, tmp_path):
    ref = write_reference(tmp_path / "ref.safetensors", {"a": (4, 3), "b": (2, 3)}, 0)
    out = tmp_path / "fused.safetensors"
    rc, stdout, err = run(capsys, "fuse", pair[0], ref, "-o", out)
    assert rc == 0, err
    assert out.is_file() and "not PEFT OFT" in stdout


def test_reference_input_to_peft(capsys, tmp_path):
    refs = [
        write_reference(tmp_path / f"{n}.safetensors", {"a": (4, 3)}, i)
        for i, n in enumerate(("c", "s"))
    ]
    assert_bad(
        capsys,
        tmp_path,
        refs,
        ["fuse", *refs, "-o", tmp_path / "out", "--to", "peft"],
        refs[0],
        "not block-diagonal",
        "bake",
    )


def test_config_disagreeing_with_weights(capsys, pair, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pair[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "oft_block_size": 2}))
    assert_bad(
        capsys,
        tmp_path,
        [bad, pair[1]],
        ["fuse", bad, pair[1], "-o", tmp_path / "out"],
        bad / "adapter_model.safetensors",
        "base_model.model.a.oft_R.weight",
        "oft_block_size=2",
    )


def test_mixed_block_sizes(capsys, pair, tmp_path):
    other = make_adapter(tmp_path / "other", 5, oft_block_size=6)
    assert_bad(
        capsys,
        tmp_path,
        [pair[0], other],
        ["fuse", pair[0], other, "-o", tmp_path / "out"],
        other,
        "blocks",
    )


def test_existing_output_folder(capsys, pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert_bad(capsys, tmp_path, pair, ["fuse", *pair, "-o", out], out, "exists", "--overwrite")
    (out / "notes.txt").write_text("mine")
    assert_bad(capsys, tmp_path, pair, ["fuse", *pair, "-o", out, "--overwrite"], out, "notes.txt")
    (out / "notes.txt").unlink()
    rc, _, err = run(capsys, "fuse", *pair, "-o", out, "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "OFT"


def test_output_equal_to_an_input(capsys, pair, tmp_path):
    for out in (pair[0], pair[1]):
        assert_bad(
            capsys,
            pair[0].parent,
            pair,
            ["fuse", *pair, "-o", out, "--overwrite"],
            out,
            "input",
        )
