"""PEFT OFT reading: synthetic files in each documented format, checked against torch transcriptions
of PEFT's own forward passes (orientation, packing, scales)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orthofuse_jax.fusion.adapter import to_layers, to_orthogonal
from orthofuse_jax.fusion.io import AdapterFileError
from orthofuse_jax.fusion.peft import PeftOFTWarning, load_peft_oft, neumann_series
from orthofuse_jax.geometry import gs_apply

MOD = "base_model.model.encoder.layers.0.self_attn.q_proj"
R_BLOCKS, B = 4, 5
N = R_BLOCKS * B


def _x(rows=3, n=N):
    return np.cos(0.7 * np.arange(rows * n) + 0.3).reshape(rows, n)


def _ours(adapter, name, x):
    L, R = to_layers(to_orthogonal(adapter.astype(np.float64)))[name]
    return np.asarray(gs_apply(np.asarray(x), np.asarray(L), np.asarray(R)))


def _write(tmp_path, tensors, config=None):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    save_file(
        {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()},
        str(d / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", **config}))
    return d


# --- PEFT >= 0.16: OFTRotationModule, packed strict upper triangle, x @ R on row vectors ----------


def _peft016_rotation(vec, exact, terms=5):
    """Transcription of PEFT's OFTRotationModule (_pytorch_skew_symmetric + _cayley_batch + forward)."""
    r, m = vec.shape
    rows, cols = torch.triu_indices(B, B, 1)
    M = torch.zeros(r, B, B, dtype=vec.dtype)
    M[:, rows, cols] = vec
    Q = M - M.transpose(-2, -1)
    if exact:
        eye = torch.eye(B, dtype=vec.dtype).expand(r, B, B)
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    Rm = torch.eye(B, dtype=vec.dtype).repeat(r, 1, 1)
    Rm = Rm + 2 * Q
    Q2 = Q @ Q
    Rm = Rm + 2 * Q2
    P = Q2
    for _ in range(3, terms - 1):
        P = P @ Q
        Rm = Rm + 2 * P
    P = P @ Q
    return Rm + P


def _peft016_forward(x, vec, exact):
    R = _peft016_rotation(torch.as_tensor(vec, dtype=torch.float64), exact)
    xr = torch.as_tensor(x).reshape(x.shape[0], R_BLOCKS, B)
    return torch.einsum("...rk,rkc->...rc", xr, R).reshape(x.shape).numpy()


def test_v016_exact_mode(tmp_path):
    rng = np.random.default_rng(0)
    vec = (0.4 * rng.standard_normal((R_BLOCKS, B * (B - 1) // 2))).astype(np.float32)
    d = _write(tmp_path, {MOD + ".oft_R.weight": vec}, {"use_cayley_neumann": False})
    a = load_peft_oft(d)
    name = "encoder.layers.0.self_attn.q_proj"
    assert a.layer_names == (name,)
    L, R = to_layers(a)[name]
    np.testing.assert_array_equal(np.asarray(L), 0)  # L = I
    x = _x()
    np.testing.assert_allclose(
        _ours(a, name, x), _peft016_forward(x, vec.astype(np.float64), exact=True), atol=1e-6
    )


def test_load_adapter_reads_peft_folders_and_files(tmp_path):
    from orthofuse_jax.fusion import load_adapter

    rng = np.random.default_rng(0)
    vec = (0.4 * rng.standard_normal((R_BLOCKS, B * (B - 1) // 2))).astype(np.float32)
    d = _write(tmp_path, {MOD + ".oft_R.weight": vec}, {"use_cayley_neumann": False})
    want = load_peft_oft(d)
    for path in (
        d,
        d / "adapter_model.safetensors",
    ):  # the one loader: folder or file, format from the keys
        got = load_adapter(path)
        assert got.layer_names == want.layer_names
        for a, b in zip(to_layers(got).values(), to_layers(want).values()):
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_v016_neumann_mode_orientation(tmp_path):
    rng = np.random.default_rng(1)
    vec = (0.02 * rng.standard_normal((R_BLOCKS, B * (B - 1) // 2))).astype(np.float32)
    name = "encoder.layers.0.self_attn.q_proj"
    x = _x()
    ref = _peft016_forward(x, vec.astype(np.float64), exact=False)
    d = _write(
        tmp_path,
        {MOD + ".oft_R.weight": vec},
        {"use_cayley_neumann": True, "num_cayley_neumann_terms": 5},
    )
    a = load_peft_oft(d)
    # the truncated series differs from the rotation it approximates by O(|S|^4) ~ 1e-5 here
    np.testing.assert_allclose(_ours(a, name, x), ref, atol=1e-4)
    # reading it in the wrong mode rotates the other way: a visible difference at this size
    wrong = load_peft_oft(d, cayley_neumann=False)
    assert np.abs(_ours(wrong, name, x) - ref).max() > 1e-2


def test_v016_without_config_assumes_neumann_and_warns(tmp_path):
    rng = np.random.default_rng(2)
    vec = (0.02 * rng.standard_normal((R_BLOCKS, 10))).astype(np.float32)
    p = _write(tmp_path, {MOD + ".oft_R.weight": vec}) / "adapter_model.safetensors"
    with pytest.warns(PeftOFTWarning, match="Cayley-Neumann"):
        a = load_peft_oft(p)
    x = _x()
    np.testing.assert_allclose(
        _ours(a, "encoder.layers.0.self_attn.q_proj", x),
        _peft016_forward(x, vec.astype(np.float64), exact=False),
        atol=1e-4,
    )


def test_neumann_series_matches_peft_loop_and_warns_for_large_rotations(tmp_path):
    rng = np.random.default_rng(3)
    vec = rng.standard_normal((R_BLOCKS, 10))
    ref = _peft016_rotation(torch.as_tensor(vec), exact=False).numpy()
    rows, cols = np.triu_indices(B, 1)
    M = np.zeros((R_BLOCKS, B, B))
    M[:, rows, cols] = vec
    np.testing.assert_allclose(neumann_series(M - np.swapaxes(M, -1, -2), 5), ref, atol=1e-12)
    d = _write(
        tmp_path, {MOD + ".oft_R.weight": vec.astype(np.float32)}, {"use_cayley_neumann": True}
    )
    with pytest.warns(PeftOFTWarning, match="differs"):
        load_peft_oft(d)


def test_v016_bad_packed_length(tmp_path):
    d = _write(
        tmp_path,
        {MOD + ".oft_R.weight": np.zeros((4, 7), np.float32)},
        {"use_cayley_neumann": False},
    )
    with pytest.raises(AdapterFileError, match="b\\(b-1\\)/2"):
        load_peft_oft(d)


def test_block_share_rejected(tmp_path):
    d = _write(
        tmp_path, {MOD + ".oft_R.weight": np.zeros((1, 10), np.float32)}, {"block_share": True}
    )
    with pytest.raises(AdapterFileError, match="block_share"):
        load_peft_oft(d)


# --- PEFT 0.14-0.15: oft_r [r, b, b] + oft_s [out, 1]; rotates the weight's input side ------------


def test_v014_input_rotation_and_scale(tmp_path):
    rng = np.random.default_rng(4)
    out_f = 7
    oft_r = (0.3 * rng.standard_normal((R_BLOCKS, B, B))).astype(
        np.float32
    )  # not skew: PEFT skews it
    oft_s = (1 + 0.1 * rng.standard_normal((out_f, 1))).astype(np.float32)
    W = rng.standard_normal((out_f, N))
    d = _write(tmp_path, {MOD + ".oft_r": oft_r, MOD + ".oft_s": oft_s})
    a = load_peft_oft(d)
    name = "encoder.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(np.asarray(a.scales[name]), oft_s[:, 0])
    # PEFT 0.14 Linear.forward: Q = solve(I + S, I - S, left=False); W' = (BD(Q) @ W^T)^T * oft_s
    data = torch.as_tensor(oft_r, dtype=torch.float64)
    S = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(B, dtype=torch.float64).expand(R_BLOCKS, B, B)
    Q = torch.linalg.solve(eye + S, eye - S, left=False)
    Wp = (torch.block_diag(*Q) @ torch.as_tensor(W).T).T * torch.as_tensor(
        oft_s, dtype=torch.float64
    )
    x = _x()
    ref = (torch.as_tensor(x) @ Wp.T).numpy()
    ours = (_ours(a, name, x) @ W.T) * np.asarray(a.scales[name], dtype=np.float64)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --- PEFT <= 0.13 (LyCORIS-based): oft_r only; rotates the layer's OUTPUT ------------------------


def test_v013_output_rotation(tmp_path):
    rng = np.random.default_rng(5)
    oft_r = (0.3 * rng.standard_normal((R_BLOCKS, B, B))).astype(np.float32)
    W = rng.standard_normal((N, 6))  # out = N features rotated
    d = _write(tmp_path, {MOD + ".oft_r": oft_r})
    a = load_peft_oft(d)
    assert a.scales == {}
    data = torch.as_tensor(oft_r, dtype=torch.float64)
    S = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(B, dtype=torch.float64).expand(R_BLOCKS, B, B)
    Q = torch.bmm(eye - S, torch.inverse(eye + S))
    x = np.sin(np.arange(3 * 6) + 0.5).reshape(3, 6)
    ref = ((torch.as_tensor(x) @ torch.as_tensor(W).T) @ torch.block_diag(*Q)).numpy()
    ours = _ours(a, "encoder.layers.0.self_attn.q_proj", x @ W.T)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_unexpected_and_non_finite_keys(tmp_path):
    d = _write(
        tmp_path,
        {
            MOD + ".oft_r": np.zeros((2, 3, 3), np.float32),
            MOD + ".lora_A.weight": np.zeros((2, 2), np.float32),
        },
    )
    with pytest.raises(AdapterFileError, match="lora_A"):
        load_peft_oft(d)
    bad = np.zeros((2, 3, 3), np.float32)
    bad[0, 0, 1] = np.inf
    d2 = tmp_path / "two"
    d2.mkdir()
    save_file({MOD + ".oft_r": torch.as_tensor(bad)}, str(d2 / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="non-finite"):
        load_peft_oft(d2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_peft_oft(_write(tmp_path, {MOD + ".oft_r": np.zeros((2, 3, 3), np.float32)}))
