"""LyCORIS BOFT (butterfly OFT) files: one-block files (``block_num = 1``, a single butterfly
stage) bake to the weights the ``lycoris`` package itself merges and merges of them are written
back as BOFT files that ``lycoris`` loads; files over 2 or 4 blocks are refused, and a rank
criterion on lycoris's own butterfly product shows they are not output-side GS rotations ``Q^T``
with ``Q = P^T BD(L) P BD(R)``."""

from __future__ import annotations

import logging

import lycoris_files
import numpy as np
import pytest
import torch
from lycoris.functional.boft import _diff_weight
from lycoris.wrapper import create_lycoris_from_weights
from lycoris_files import baked, unet_folder
from safetensors.torch import load_file, save_file

from orthofuse_jax.cli import main
from orthofuse_jax.fusion import merge
from orthofuse_jax.fusion.io import AdapterFileError
from orthofuse_jax.fusion.lycoris import boft_stages, load_lycoris_oft, save_lycoris_oft

logging.getLogger("LyCORIS").setLevel(logging.WARNING)


class Attn(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.to_q = torch.nn.Linear(8, width, bias=False)


class Tiny(torch.nn.Module):
    """``attn1.to_q`` with ``width`` outputs and a conv with 8; ``linear_dim = 8`` gives
    ``block_num = width / 8`` for the linear layer and 1 for the conv."""

    def __init__(self, width):
        super().__init__()
        self.attn1 = Attn(width)
        self.my_conv = torch.nn.Conv2d(3, 8, 3)


def make_model(width, seed=0):
    torch.manual_seed(seed)
    return Tiny(width)


def make_file(path, model, **kw):
    """A random BOFT adapter of ``model`` saved by ``lycoris``; returns lycoris's merged weights."""
    return lycoris_files.make_file(path, model, algo="boft", linear_dim=8, **kw)


@pytest.mark.parametrize("alpha", [0.0, 0.05])
@pytest.mark.parametrize("rescaled", [False, True])
def test_one_block_boft_bakes_to_lycoris_merge(tmp_path, alpha, rescaled):
    folder = unet_folder(tmp_path, make_model(8))
    file = tmp_path / "a.safetensors"
    want = make_file(file, make_model(8), seed=1, alpha=alpha, rescaled=rescaled)
    stored = load_file(str(file))
    assert stored["lycoris_attn1_to_q.oft_blocks"].shape == (1, 1, 8, 8)
    adapter = load_lycoris_oft(file)
    assert adapter.side == "output"
    assert sorted(adapter.layer_names) == ["attn1.to_q", "my.conv"]
    got = baked(tmp_path, folder, file)
    original = make_model(8).state_dict()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, rtol=1e-5, err_msg=key)
    for key in ("attn1.to_q.weight", "my_conv.weight"):  # the adapter changes the weights
        assert np.abs(got[key] - original[key].numpy()).max() > 1e-2
    if alpha:  # the constraint is active: the stored q is not the effective one
        q = stored["lycoris_attn1_to_q.oft_blocks"].numpy()
        assert np.linalg.norm(q - q.swapaxes(-1, -2)) > alpha * 8 * 1.5


def test_fused_one_block_boft_is_written_as_boft(tmp_path, capsys):
    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    want_a = make_file(fa, make_model(8), seed=1, rescaled=True)
    make_file(fb, make_model(8), seed=2, rescaled=True)
    out = tmp_path / "m.safetensors"
    argv = ["fuse", str(fa), str(fb), "-o", str(out), "--t", "0", "--restore", "exact"]
    assert main([*argv, "--scales", "linear"]) == 0
    capsys.readouterr()
    written, first = load_file(str(out)), load_file(str(fa))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in first.items()}
    model = make_model(8)  # lycoris loads the BOFT file; at t = 0 it is the first adapter
    net, _ = create_lycoris_from_weights(1.0, str(out), model)
    net.apply_to()
    net.load_weights(str(out))
    net.merge_to(1.0)
    for key, v in model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), want_a[key], atol=2e-6, rtol=1e-5, err_msg=key)
    # a proper merge written as BOFT: lycoris's merge of it equals our bake of the merge
    merged = merge([load_lycoris_oft(fa), load_lycoris_oft(fb)], t=0.4, scales="linear")
    out4 = tmp_path / "m4.safetensors"
    save_lycoris_oft(out4, merged, template=fa, inputs=[fa, fb])
    model = make_model(8)
    net, _ = create_lycoris_from_weights(1.0, str(out4), model)
    net.apply_to()
    net.load_weights(str(out4))
    net.merge_to(1.0)
    ours = baked(tmp_path, unet_folder(tmp_path, make_model(8)), merged)
    for key, v in model.state_dict().items():
        np.testing.assert_allclose(ours[key], v.numpy(), atol=2e-6, rtol=1e-5, err_msg=key)


def lycoris_rotation(blocks):
    """lycoris's own butterfly product ``M`` (``W <- M W``) for ``oft_blocks``, in float64."""
    n = blocks.shape[1] * blocks.shape[2]
    eye = torch.eye(n, dtype=torch.float32)
    delta = _diff_weight(eye, torch.tensor(blocks, dtype=torch.float32), None, 0, 1)
    return (delta + eye).double().numpy()


def is_output_gs(M, nb, b, tol=1e-4):
    """Whether ``M = Q^T`` for ``Q = P^T BD(L) P BD(R)`` (nb blocks of b, nb <= b): then
    ``M = BD(R)^T X`` with ``X`` block-diagonal on the residue classes mod ``nb``, so every row
    block ``M[C]`` has rank ``b - b / nb`` on the columns outside each residue class."""
    n = nb * b
    for c in range(nb):
        for v in range(nb):
            other = np.setdiff1d(np.arange(n), np.arange(v, n, nb))
            if np.linalg.matrix_rank(M[c * b : (c + 1) * b][:, other], tol=tol) != b - b // nb:
                return False
    return True


@pytest.mark.parametrize("nb,b", [(2, 4), (2, 8), (4, 4)])
def test_multi_block_butterfly_is_not_output_gs(nb, b):
    rng = np.random.default_rng(nb * b)
    # the criterion holds for a real GS rotation built in float64 (P from its definition)
    L, R = (_cay(_skew(rng, (nb, b, b))) for _ in range(2))
    P = np.eye(nb * b)[np.arange(nb * b).reshape(b, nb).T.reshape(-1)]
    Q = P.T @ _bd(L) @ P @ _bd(R)
    assert is_output_gs(Q.T, nb, b)
    M = lycoris_rotation(0.3 * rng.normal(size=(boft_stages(nb), nb, b, b)))
    np.testing.assert_allclose(M @ M.T, np.eye(nb * b), atol=1e-5)
    assert not is_output_gs(M, nb, b)


def _skew(rng, shape):
    a = 0.3 * rng.normal(size=shape)
    return a - a.swapaxes(-1, -2)


def _cay(S):
    eye = np.eye(S.shape[-1])
    return np.linalg.solve(eye - S, eye + S)


def _bd(blocks):
    n = blocks.shape[0] * blocks.shape[1]
    out = np.zeros((n, n))
    for i, blk in enumerate(blocks):
        out[i * len(blk) : (i + 1) * len(blk), i * len(blk) : (i + 1) * len(blk)] = blk
    return out


@pytest.mark.parametrize("width,num,stages", [(16, 2, 2), (32, 4, 3)])
def test_multi_block_boft_is_refused(tmp_path, capsys, width, num, stages):
    file = tmp_path / "a.safetensors"
    make_file(file, make_model(width), seed=1)
    key = "lycoris_attn1_to_q.oft_blocks"
    assert load_file(str(file))[key].shape == (stages, num, 8, 8)
    before = file.read_bytes()
    with pytest.raises(AdapterFileError) as err:
        load_lycoris_oft(file)
    msg = str(err.value)
    assert str(file) in msg and repr(key) in msg and "not a GS matrix" in msg
    assert f"m={stages} butterfly stages over {num} blocks" in msg
    folder = unet_folder(tmp_path, make_model(width))
    bake = ["bake", "--model", str(folder), "--adapter", str(file), "-o", str(tmp_path / "o")]
    for argv in (["inspect", str(file)], bake):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"orthofuse-jax {argv[0]}: error:" in lines[0], lines
        assert str(file) in lines[0] and repr(key) in lines[0] and "not a GS matrix" in lines[0]
    assert not (tmp_path / "o").exists()
    assert file.read_bytes() == before


def test_bad_boft_shapes_are_refused(tmp_path):
    for shape, why in [
        ((2, 1, 8, 8), "2 butterfly stages over one block"),
        ((1, 1, 7, 7), "even b"),
    ]:
        file = tmp_path / "bad.safetensors"
        save_file(
            {
                "lycoris_attn1_to_q.oft_blocks": torch.zeros(shape),
                "lycoris_attn1_to_q.alpha": torch.tensor(0.0),
            },
            str(file),
        )
        with pytest.raises(AdapterFileError, match=why) as err:
            load_lycoris_oft(file)
        assert str(file) in str(err.value) and "lycoris_attn1_to_q.oft_blocks" in str(err.value)
