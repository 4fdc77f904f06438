"""``bake_unet`` of LyCORIS ``diag-oft`` files: the baked torch weights equal those the ``lycoris``
package itself merges (linear and conv layers, constrained or not, rescaled or not), also after a
merge of two files written back with ``save_lycoris_oft`` and loaded by ``lycoris``."""

from __future__ import annotations

import logging

import lycoris_files
import numpy as np
import pytest
import torch
from lycoris.wrapper import create_lycoris_from_weights
from lycoris_files import baked, merged_weights, unet_folder
from safetensors.torch import load_file

from orthofuse_jax.fusion import merge
from orthofuse_jax.fusion.lycoris import load_lycoris_oft, save_lycoris_oft

logging.getLogger("LyCORIS").setLevel(logging.WARNING)


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 12, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(12, 8)])


class Tiny(torch.nn.Module):
    """Module names with ``_`` in components (``to_q``, ``my_conv``) to exercise the name decoding."""

    def __init__(self):
        super().__init__()
        self.attn1 = Attn()
        self.my_conv = torch.nn.Conv2d(3, 8, 3)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def make_file(path, model, **kw):
    """A random diag-oft adapter of ``model`` saved by ``lycoris``; returns lycoris's merged weights."""
    return lycoris_files.make_file(path, model, algo="diag-oft", linear_dim=4, **kw)


@pytest.mark.parametrize("alpha", [0.0, 0.02])
@pytest.mark.parametrize("rescaled", [False, True])
def test_bake_equals_lycoris_merge(tmp_path, alpha, rescaled):
    folder = unet_folder(tmp_path, make_model())
    file = tmp_path / "a.safetensors"
    want = make_file(file, make_model(), seed=1, alpha=alpha, rescaled=rescaled)
    adapter = load_lycoris_oft(file)
    assert adapter.side == "output"
    assert sorted(adapter.layer_names) == ["attn1.to_out.0", "attn1.to_q", "my.conv"]
    got = baked(tmp_path, folder, file)
    original = make_model().state_dict()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, rtol=1e-5, err_msg=key)
    # the adapter does change every weight (a test that can fail)
    for key in ("attn1.to_q.weight", "attn1.to_out.0.weight", "my_conv.weight"):
        assert np.abs(got[key] - original[key].numpy()).max() > 1e-2
    if alpha:  # the constraint is active: the stored q is not the effective one
        q = load_file(str(file))["lycoris_attn1_to_q.oft_blocks"].numpy()
        q = q - q.transpose(0, 2, 1)
        assert np.linalg.norm(q) > alpha * 12 * 1.5


def test_merge_roundtrip_through_lycoris(tmp_path):
    folder = unet_folder(tmp_path, make_model())
    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    want_a = make_file(fa, make_model(), seed=1, rescaled=True)
    make_file(fb, make_model(), seed=2, rescaled=True)
    a, b = load_lycoris_oft(fa), load_lycoris_oft(fb)
    m0 = merge([a, b], t=0.0, scales="linear")
    for key in m0.stacks:  # t = 0 is the first adapter
        np.testing.assert_allclose(m0.stacks[key].R, _cay(a.stacks[key].R), atol=1e-6)
    m = merge([a, b], t=0.4, scales="linear")
    assert m.side == "output"
    out = tmp_path / "m.safetensors"
    save_lycoris_oft(out, m, template=fa, inputs=[fa, fb])
    written, first = load_file(str(out)), load_file(str(fa))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in first.items()}
    model = make_model()
    net, _ = create_lycoris_from_weights(1.0, str(out), model)
    net.apply_to()
    net.load_weights(str(out))
    theirs = merged_weights(model, net)
    ours = baked(tmp_path, folder, m)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=2e-6, rtol=1e-5, err_msg=key)
    # the t = 0 merge written and baked gives the first file's weights
    out0 = tmp_path / "m0.safetensors"
    save_lycoris_oft(out0, m0, template=fa)
    got0 = baked(tmp_path, folder, out0, "out0")
    for key in want_a:
        np.testing.assert_allclose(got0[key], want_a[key], atol=2e-6, rtol=1e-5, err_msg=key)


def _cay(S):
    S = np.asarray(S, np.float64)
    eye = np.eye(S.shape[-1])
    return np.linalg.solve(eye - S, eye + S)


def test_fuse_command_writes_lycoris_for_lycoris_inputs(tmp_path, capsys):
    from orthofuse_jax.cli import main

    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    want_a = make_file(fa, make_model(), seed=1, rescaled=True)
    make_file(fb, make_model(), seed=2, rescaled=True)
    before = {p: p.read_bytes() for p in (fa, fb)}
    assert main(["inspect", str(fa)]) == 0
    assert "format: lycoris (lycoris-diag-oft)" in capsys.readouterr().out
    out = tmp_path / "m.safetensors"
    argv = ["fuse", str(fa), str(fb), "-o", str(out), "--t", "0", "--restore", "exact"]
    assert main([*argv, "--scales", "linear"]) == 0
    assert "a LyCORIS OFT file" in capsys.readouterr().out
    model = make_model()  # lycoris loads the fused file; at t = 0 it is the first adapter
    net, _ = create_lycoris_from_weights(1.0, str(out), model)
    net.apply_to()
    net.load_weights(str(out))
    got = merged_weights(model, net)
    for key in want_a:
        np.testing.assert_allclose(got[key], want_a[key], atol=2e-6, rtol=1e-5, err_msg=key)
    # LyCORIS adapters rotate output features: no reference or PEFT file can hold them
    for to in ("reference", "peft"):
        bad = tmp_path / f"bad-{to}"
        rc = main(["fuse", str(fa), str(fb), "-o", str(bad), "--to", to])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "output features" in err, err
        assert not bad.exists()
    assert {p: p.read_bytes() for p in (fa, fb)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "m.safetensors",
    ]
