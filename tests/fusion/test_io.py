"""Reference checkpoint I/O (docs/math.md §5): round trips, reference interop in torch, and bad input."""

from __future__ import annotations

import json
import os
import struct
import warnings

import numpy as np
import pytest

from orthofuse_jax.fusion.adapter import GSAdapter, from_layers, to_layers, to_orthogonal
from orthofuse_jax.fusion.io import (
    AdapterFileError,
    NonSkewWarning,
    check_pair,
    load_adapter,
    read_tensors,
    save_adapter,
)

PROC = "down_blocks.1.attentions.0.transformer_blocks.0.attn{}.processor"
SHAPES = {  # layer -> (nb, b); two block shapes, processor-style names
    PROC.format(1) + ".to_q_moft": (4, 3),
    PROC.format(1) + ".to_k_moft": (4, 3),
    PROC.format(2) + ".to_k_moft": (2, 5),
    PROC.format(2) + ".to_out_moft": (4, 3),
}


def _skew(rng, shape, scale=0.3):
    g = rng.standard_normal(shape) * scale
    return (0.5 * (g - np.swapaxes(g, -1, -2))).astype(np.float32)


def make_tensors(seed=0, shapes=SHAPES, scale=0.3):
    rng = np.random.default_rng(seed)
    t = {}
    for name, (nb, b) in shapes.items():
        t[name + ".ort_monarch.L"] = _skew(rng, (nb, b, b), scale)
        t[name + ".ort_monarch.R"] = _skew(rng, (nb, b, b), scale)
        head, _, last = name.rpartition(".")
        t[f"{head}.{last.replace('to_', '').replace('_moft', '')}_scale"] = (
            1 + 0.1 * rng.standard_normal(nb * b)
        ).astype(np.float32)
    return t


def write_torch(path, tensors, metadata=None):
    """Write exactly as the reference does: safetensors.torch.save_file with format pt."""
    import torch
    from safetensors.torch import save_file

    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
        str(path),
        metadata=metadata or {"format": "pt"},
    )
    return path


# ------------------------------------------------------------------------------------------------


def test_load_reference_written_file(tmp_path):
    t = make_tensors()
    p = write_torch(tmp_path / "a.safetensors", t)
    a = load_adapter(p)
    assert a.num_layers == 4 and not a.orthogonal
    assert set(a.stacks) == {"nb4_b3", "nb2_b5"}
    layers = to_layers(a)
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(layers[name][0]), t[name + ".ort_monarch.L"])
        np.testing.assert_array_equal(np.asarray(layers[name][1]), t[name + ".ort_monarch.R"])
        assert np.asarray(layers[name][0]).dtype == np.float32
    # scales: processor.q_scale -> layer processor.to_q_moft
    np.testing.assert_array_equal(
        np.asarray(a.scales[PROC.format(1) + ".to_q_moft"]), t[PROC.format(1) + ".q_scale"]
    )
    np.testing.assert_array_equal(
        np.asarray(a.scales[PROC.format(2) + ".to_out_moft"]), t[PROC.format(2) + ".out_scale"]
    )


def test_raw_round_trip_exact(tmp_path):
    t = make_tensors(1)
    a = load_adapter(write_torch(tmp_path / "a.safetensors", t))
    out = save_adapter(tmp_path / "b.safetensors", a)
    back, meta = read_tensors(out)
    assert meta == {"format": "pt"}
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], t[k])


def test_written_file_matches_reference_key_format(tmp_path):
    from safetensors import safe_open

    a = load_adapter(write_torch(tmp_path / "a.safetensors", make_tensors(2)))
    p = save_adapter(tmp_path / "b.safetensors", a, metadata={"note": "x"})
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        keys = set(f.keys())
        for name, (nb, b) in SHAPES.items():
            for side in "LR":
                k = f"{name}.ort_monarch.{side}"
                assert k in keys
                assert tuple(f.get_slice(k).get_shape()) == (nb, b, b)
                assert f.get_slice(k).get_dtype() == "F32"
        assert PROC.format(2) + ".k_scale" in keys


def test_orthogonal_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    layers = {
        n: (_skew(rng, (nb, b, b), 0.8), _skew(rng, (nb, b, b), 0.8))
        for n, (nb, b) in SHAPES.items()
    }
    u = to_orthogonal(from_layers(layers, dtype=np.float64))
    p = save_adapter(tmp_path / "m.safetensors", u)
    back = to_orthogonal(load_adapter(p).astype(np.float64))
    for (n, (y1, y2)), (n2, (z1, z2)) in zip(
        sorted(to_layers(u).items()), sorted(to_layers(back).items())
    ):
        assert n == n2
        np.testing.assert_allclose(np.asarray(z1), np.asarray(y1), atol=2e-6)
        np.testing.assert_allclose(np.asarray(z2), np.asarray(y2), atol=2e-6)


def test_merged_file_reproduces_layer_output_in_reference_torch(tmp_path):
    """A merged adapter we write, loaded and applied the reference's way in torch, gives our merged layer."""
    import torch
    from models.torch_reference import (
        butterfly as torch_butterfly,  # tests/models: the torch transcription
    )
    from models.torch_reference import cayley as torch_cayley
    from safetensors.torch import load_file

    from orthofuse_jax.fusion.merge import merge
    from orthofuse_jax.geometry import gs_apply

    c = load_adapter(write_torch(tmp_path / "c.safetensors", make_tensors(4, scale=0.5)))
    s = load_adapter(write_torch(tmp_path / "s.safetensors", make_tensors(5, scale=0.5)))
    m = merge(
        [c.astype(np.float64), s.astype(np.float64)], t=0.6, method="geodesic", restore="cayley"
    )
    p = save_adapter(tmp_path / "m.safetensors", m, inputs=[tmp_path / "c.safetensors"])
    sd = load_file(str(p))
    x = np.sin(np.arange(3 * 12) + 1.0).reshape(3, 12)
    for name, (L, R) in to_layers(m).items():
        nb, b = SHAPES[name]
        xx = x[:, : nb * b] if nb * b <= 12 else np.cos(np.arange(3 * nb * b)).reshape(3, nb * b)
        ours = np.asarray(gs_apply(np.asarray(xx), np.asarray(L), np.asarray(R)))
        Lt = torch_cayley(sd[name + ".ort_monarch.L"].double())
        Rt = torch_cayley(sd[name + ".ort_monarch.R"].double())
        ref = torch_butterfly(torch.from_numpy(xx), Rt, Lt).numpy()
        np.testing.assert_allclose(ref, ours, atol=2e-6)


# ------------------------------------------------------------------------------------------------ errors


def _expect(path, *needles):
    with pytest.raises(AdapterFileError) as ei:
        load_adapter(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_R(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".to_q_moft.ort_monarch.R"
    del t[k]
    _expect(write_torch(tmp_path / "x.safetensors", t), repr(k), "missing")


def test_scale_without_layer(tmp_path):
    t = make_tensors()
    t[PROC.format(1) + ".v_scale"] = np.ones(12, np.float32)
    _expect(write_torch(tmp_path / "x.safetensors", t), PROC.format(1) + ".v_scale", "without")


def test_unexpected_key(tmp_path):
    t = make_tensors()
    t["something.else.weight"] = np.ones(3, np.float32)
    _expect(write_torch(tmp_path / "x.safetensors", t), "something.else.weight", "unexpected")


def test_not_square_blocks(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".to_q_moft.ort_monarch.L"
    t[k] = np.zeros((4, 3, 2), np.float32)
    _expect(write_torch(tmp_path / "x.safetensors", t), repr(k), "[4, 3, 2]")


def test_L_R_shape_mismatch(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".to_q_moft.ort_monarch.R"
    t[k] = np.zeros((3, 4, 4), np.float32)
    _expect(write_torch(tmp_path / "x.safetensors", t), repr(k), "differs")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path, bad):
    t = make_tensors()
    k = PROC.format(2) + ".to_k_moft.ort_monarch.L"
    t[k][1, 2, 3] = bad
    _expect(write_torch(tmp_path / "x.safetensors", t), repr(k), "non-finite", "(1, 2, 3)")


def test_non_finite_scale(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".q_scale"
    t[k][5] = np.nan
    _expect(write_torch(tmp_path / "x.safetensors", t), repr(k), "non-finite")


def test_non_skew_is_projected_with_warning(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".to_k_moft.ort_monarch.R"
    a = t[k].copy()
    t[k] = a + np.float32(0.25) * np.eye(3, dtype=np.float32)[None]  # symmetric part 0.25 I
    p = write_torch(tmp_path / "x.safetensors", t)
    with pytest.warns(NonSkewWarning) as rec:
        ad = load_adapter(p)
    msg = str(rec[0].message)
    assert repr(k) in msg and str(p) in msg and "0.5" in msg  # max |A + A^T| = 2 * 0.25
    np.testing.assert_allclose(
        np.asarray(to_layers(ad)[k.rsplit(".ort_monarch", 1)[0]][1]), a, atol=1e-7
    )


def test_tiny_asymmetry_is_silent(tmp_path):
    t = make_tensors()
    k = PROC.format(1) + ".to_k_moft.ort_monarch.R"
    t[k] = t[k] + np.float32(1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(write_torch(tmp_path / "x.safetensors", t))


def test_truncated_file(tmp_path):
    p = write_torch(tmp_path / "x.safetensors", make_tensors())
    raw = p.read_bytes()
    for cut in (0, 5, 8, 20, len(raw) - 1):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(raw[:cut])
        _expect(q)


def test_garbage_and_missing_files(tmp_path):
    q = tmp_path / "g.safetensors"
    q.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}")
    _expect(q, "header")
    _expect(tmp_path / "absent.safetensors", "cannot read")
    _expect(tmp_path, "cannot read")  # a directory


def test_wrong_dtype(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = make_tensors()
    k = PROC.format(1) + ".q_scale"
    tt = {kk: torch.from_numpy(v) for kk, v in t.items()}
    tt[k] = torch.ones(12, dtype=torch.int32)
    p = tmp_path / "x.safetensors"
    save_file(tt, str(p), metadata={"format": "pt"})
    _expect(p, repr(k), "I32")


def test_header_lies_about_offsets(tmp_path):
    p = write_torch(tmp_path / "x.safetensors", make_tensors())
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    k = sorted(kk for kk in header if kk != "__metadata__")[0]
    header[k]["data_offsets"][1] += 4
    hb = json.dumps(header).encode()
    q = tmp_path / "y.safetensors"
    q.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    _expect(q, repr(k))


def test_bf16_and_f16_files_widen_to_float32(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = make_tensors()
    for dt in (torch.float16, torch.bfloat16):
        p = tmp_path / f"{dt}.safetensors"
        save_file(
            {k: torch.from_numpy(v).to(dt) for k, v in t.items()}, str(p), metadata={"format": "pt"}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonSkewWarning)
            a = load_adapter(p)
        k = PROC.format(1) + ".to_q_moft"
        expect = torch.from_numpy(t[k + ".ort_monarch.L"]).to(dt).float().numpy()
        np.testing.assert_allclose(
            np.asarray(to_layers(a)[k][0]), 0.5 * (expect - np.swapaxes(expect, -1, -2)), atol=1e-7
        )


def test_nb_mismatch_between_adapters(tmp_path):
    a = load_adapter(write_torch(tmp_path / "a.safetensors", make_tensors()))
    shapes = dict(SHAPES)
    shapes[PROC.format(1) + ".to_k_moft"] = (2, 6)
    p2 = write_torch(tmp_path / "b.safetensors", make_tensors(shapes=shapes))
    b = load_adapter(p2)
    with pytest.raises(AdapterFileError) as ei:
        check_pair([a, b], [tmp_path / "a.safetensors", p2])
    assert str(p2) in str(ei.value) and PROC.format(1) + ".to_k_moft" in str(ei.value)


# ------------------------------------------------------------------------------------------------ writing


def _adapter():
    rng = np.random.default_rng(9)
    return from_layers(
        {n: (_skew(rng, (nb, b, b)), _skew(rng, (nb, b, b))) for n, (nb, b) in SHAPES.items()}
    )


def test_refuses_to_overwrite_input(tmp_path):
    p = write_torch(tmp_path / "a.safetensors", make_tensors())
    before = p.read_bytes()
    a = load_adapter(p)
    link = tmp_path / "link.safetensors"
    os.symlink(p, link)
    hard = tmp_path / "hard.safetensors"
    os.link(p, hard)
    for out, inp in (
        (p, p),
        (link, p),
        (p, link),
        (hard, p),
        (tmp_path / "." / "a.safetensors", p),
    ):
        with pytest.raises(AdapterFileError, match="input"):
            save_adapter(out, a, inputs=[inp])
    assert p.read_bytes() == before


def test_non_finite_adapter_writes_nothing(tmp_path):
    a = _adapter()
    bad = a.map_stacks(lambda x: x.at[0, 0, 0, 1].set(np.nan))
    out = tmp_path / "o.safetensors"
    with pytest.raises(AdapterFileError, match="non-finite"):
        save_adapter(out, bad)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    import orthofuse_jax.fusion.io as io

    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(AdapterFileError, match="No space"):
        save_adapter(out, _adapter())
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_output_directory_must_exist(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        save_adapter(tmp_path / "nope" / "o.safetensors", _adapter())
    assert isinstance(AdapterFileError("x"), ValueError)
    assert isinstance(_adapter(), GSAdapter)


def test_save_merged_reports_the_orthogonality_error_of_the_blocks_written(tmp_path):
    from orthofuse_jax.fusion import save_merged

    rng = np.random.default_rng(3)
    blocks = {}
    for name in ("p.processor.to_q_moft", "p.processor.to_k_moft"):
        q = np.linalg.qr(rng.standard_normal((2, 2, 5, 5)))[0]  # orthogonal blocks, float64
        blocks[name] = (q[0], q[1])
    u = from_layers(blocks, orthogonal=True, dtype=np.float64)
    assert save_merged(tmp_path / "a.safetensors", u) < 1e-13
    bent = u.map_stacks(lambda x: x.at[0, 1, 2, 3].add(1e-3))
    want = max(
        float(np.abs(np.swapaxes(y, -1, -2) @ y - np.eye(5)).max())
        for y in (np.asarray(s.L) for s in bent.stacks.values())
    )
    np.testing.assert_allclose(save_merged(tmp_path / "b.safetensors", bent), want, rtol=1e-12)
