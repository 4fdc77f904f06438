"""Fuzz: corrupting a valid small adapter file gives a clean error naming the file, or loads."""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax.fusion.io import AdapterFileError, load_adapter


def _valid_bytes() -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    t = {}
    for name, (nb, b) in {"p.processor.to_q_moft": (2, 3), "p.processor.to_k_moft": (1, 4)}.items():
        for side in "LR":
            g = rng.standard_normal((nb, b, b)).astype(np.float32)
            t[f"{name}.ort_monarch.{side}"] = 0.5 * (g - np.swapaxes(g, -1, -2))
    t["p.processor.q_scale"] = np.ones(6, np.float32)
    return save(t, metadata={"format": "pt"})


VALID = _valid_bytes()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8 : 8 + HEADER_LEN])
TENSOR_KEYS = sorted(k for k in HEADER if k != "__metadata__")


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.safetensors"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_adapter(path)
        except AdapterFileError as e:
            msg = str(e)
            assert str(path) in msg, msg
            assert "\n" not in msg
        except ValueError as e:  # pragma: no cover - any ValueError must still name the file
            assert str(path) in str(e), repr(e)
        # any other exception type propagates and fails the test


@given(
    st.lists(
        st.tuples(st.integers(0, 8 + HEADER_LEN - 1), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_corrupt_header_bytes(edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    _check(bytes(data))


@given(
    st.lists(
        st.tuples(st.integers(8 + HEADER_LEN, len(VALID) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=20,
    )
)
def test_corrupt_tensor_bytes(edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    _check(bytes(data))


@given(st.integers(0, len(VALID) - 1))
def test_truncated(cut):
    _check(VALID[:cut])


@given(st.binary(min_size=1, max_size=64), st.integers(0, len(VALID)))
def test_inserted_bytes(junk, pos):
    _check(VALID[:pos] + junk + VALID[pos:])


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@given(
    st.sampled_from(TENSOR_KEYS),
    st.sampled_from(["dtype", "shape", "data_offsets", "__extra__"]),
    _json_values,
    st.booleans(),
)
def test_corrupt_header_fields(key, field, value, keep_length):
    header = json.loads(json.dumps(HEADER))
    if field == "__extra__":
        header[key] = value
    else:
        header[key][field] = value
    hb = json.dumps(header).encode()
    if keep_length and len(hb) <= HEADER_LEN:
        hb = hb + b" " * (HEADER_LEN - len(hb))
    _check(struct.pack("<Q", len(hb)) + hb + VALID[8 + HEADER_LEN :])


@given(
    st.sampled_from(TENSOR_KEYS),
    st.lists(st.integers(0, 80), min_size=0, max_size=4),
    st.integers(0, 400),
    st.integers(0, 400),
)
def test_consistent_but_wrong_layouts(key, shape, o0, o1):
    header = json.loads(json.dumps(HEADER))
    header[key]["shape"] = shape
    header[key]["data_offsets"] = [o0, o1]
    hb = json.dumps(header).encode()
    _check(struct.pack("<Q", len(hb)) + hb + VALID[8 + HEADER_LEN :])


def test_extreme_header_values():
    for field, value in (
        ("shape", [2**70]),
        ("shape", [2**40, 2**40]),
        ("shape", [-1]),
        ("shape", [True]),
        ("data_offsets", [2**70, 2**71]),
        ("data_offsets", [0, 2**64]),
        ("dtype", ["F32"]),
        ("dtype", "I64"),
    ):
        header = json.loads(json.dumps(HEADER))
        header[TENSOR_KEYS[0]][field] = value
        hb = json.dumps(header).encode()
        _check(struct.pack("<Q", len(hb)) + hb + VALID[8 + HEADER_LEN :])
    _check(struct.pack("<Q", 2**63) + VALID[8:])
    _check(b"")
