"""Writing PEFT OFT adapters: merged adapters written by ``save_peft_oft`` are loaded by the real
``peft`` package and compared with float64 numpy/scipy folds of the merged blocks."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import scipy.linalg as sla
import torch
from safetensors.numpy import load_file

from orthofuse_jax.fusion import load_adapter, merge
from orthofuse_jax.fusion.io import AdapterFileError, adapter_format, adapter_keys
from orthofuse_jax.fusion.peft import peft_format, save_peft_oft

IN, HID = 12, 6  # a: 12 -> 6, b: 6 -> 12


class Tiny(torch.nn.Module):
    """Two linear layers: the modules the adapters rotate."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(IN, HID)
        self.b = torch.nn.Linear(HID, IN)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def base_model():
    torch.manual_seed(0)
    return Tiny()


def make_adapter(path, seed, *, scale=0.3, **config):
    """A PEFT OFT adapter of :class:`Tiny` with random non-zero ``oft_R`` weights, saved by PEFT."""
    cfg = peft.OFTConfig(
        target_modules=["a", "b"], use_cayley_neumann=False, init_weights=False, **config
    )
    model = peft.get_peft_model(base_model(), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path))
    return path


def peft_outputs(folder, x):
    model = peft.PeftModel.from_pretrained(base_model(), str(folder)).eval()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)


def rotations(folder):
    """``{module: [r, b, b]}`` float64 rotations ``Cay(S)`` of a PEFT file, from its packed weights."""
    out = {}
    for key, vec in load_file(str(folder / "adapter_model.safetensors")).items():
        r, m = vec.shape
        b = round((1 + np.sqrt(1 + 8 * m)) / 2)
        rows, cols = np.triu_indices(b, 1)
        M = np.zeros((r, b, b))
        M[:, rows, cols] = vec
        S = M - np.swapaxes(M, -1, -2)
        eye = np.eye(b)
        name = key.removeprefix("base_model.model.").removesuffix(".oft_R.weight")
        out[name] = np.stack([np.linalg.solve(eye - s, eye + s) for s in S])
    return out


def folded_outputs(blocks, x):
    """The base model's outputs with ``W -> W BD(Y)`` per layer, in float64 numpy."""
    model = base_model()
    W = {n: getattr(model, n).weight.detach().double().numpy() for n in ("a", "b")}
    bias = {n: getattr(model, n).bias.detach().double().numpy() for n in ("a", "b")}
    eff = {n: W[n] @ sla.block_diag(*blocks[n]) for n in W}
    h = np.tanh(x @ eff["a"].T + bias["a"])
    return h @ eff["b"].T + bias["b"]


def geodesic(u1, u2, t):
    return np.stack([a @ np.real(sla.fractional_matrix_power(a.T @ b, t)) for a, b in zip(u1, u2)])


def cay(a):
    s = 0.5 * (a - np.swapaxes(a, -1, -2))
    eye = np.eye(a.shape[-1])
    return np.stack([np.linalg.solve(eye - x, eye + x) for x in s])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    return (
        make_adapter(d / "concept", 1, oft_block_size=3),
        make_adapter(d / "style", 2, oft_block_size=3),
    )


X = np.cos(0.37 * np.arange(5 * IN) + 0.1).reshape(5, IN)


def test_peft_saves_the_format_we_write(pair):
    assert adapter_format(pair[0]) == "peft"
    assert json.loads((pair[0] / "adapter_config.json").read_text())["oft_block_size"] == 3
    assert peft_format(adapter_keys(pair[0])) == "v0.16+"


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_endpoints_are_the_inputs(pair, tmp_path, t):
    c, s = (load_adapter(p) for p in pair)
    merged = merge([c, s], t=t, method="geodesic", restore="exact")
    out = save_peft_oft(tmp_path / "out", merged, base_config=pair[0], inputs=pair)
    want = peft_outputs(pair[int(t)], X)
    np.testing.assert_allclose(peft_outputs(out, X), want, atol=2e-6)


@pytest.mark.parametrize("method", ["geodesic", "cayley"])
def test_midpoint_equals_the_float64_fold(pair, tmp_path, method):
    c, s = (load_adapter(p) for p in pair)
    merged = merge([c, s], t=0.5, method=method, restore="none")
    out = save_peft_oft(tmp_path / "out", merged, base_config=pair[0], inputs=pair)
    u1, u2 = rotations(pair[0]), rotations(pair[1])
    if method == "geodesic":
        blocks = {n: geodesic(u1[n], u2[n], 0.5) for n in u1}
    else:  # Cay of the mean Cayley parameters, recovered from the blocks in float64
        blocks = {n: cay(0.5 * (sla_inv_cay(u1[n]) + sla_inv_cay(u2[n]))) for n in u1}
    np.testing.assert_allclose(peft_outputs(out, X), folded_outputs(blocks, X), atol=2e-5)
    assert not np.allclose(peft_outputs(out, X), peft_outputs(pair[0], X), atol=1e-3)


def sla_inv_cay(u):
    eye = np.eye(u.shape[-1])
    return np.stack([(y - eye) @ np.linalg.inv(y + eye) for y in u])


def test_curve_over_id_restoration_is_written_as_its_parameters(pair, tmp_path):
    c, s = (load_adapter(p) for p in pair)
    t, eta = 0.5, 1.0  # f(1/2) = alpha = 2, eta = f / 2
    merged = merge([c, s], t=t, method="geodesic", restore="none")
    out = save_peft_oft(tmp_path / "out", merged, inputs=pair, restore_eta=eta)
    u1, u2 = rotations(pair[0]), rotations(pair[1])
    blocks = {n: cay(eta * geodesic(u1[n], u2[n], t)) for n in u1}
    np.testing.assert_allclose(peft_outputs(out, X), folded_outputs(blocks, X), atol=2e-5)


@pytest.mark.parametrize("method", ["geodesic", "cayley"])
@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
@pytest.mark.parametrize("algorithm", ["eigh", "matmul"])
def test_merges_of_block_diagonal_adapters_keep_l_exactly_identity(
    pair, method, restore, algorithm
):
    c, s = (load_adapter(p) for p in pair)
    merged = merge([c, s], t=0.3, method=method, restore=restore, algorithm=algorithm)
    for stack in merged.stacks.values():
        L = np.asarray(stack.L)
        np.testing.assert_array_equal(L, np.broadcast_to(np.eye(L.shape[-1]), L.shape))


def test_config_fields(pair, tmp_path):
    src = json.loads((pair[0] / "adapter_config.json").read_text())
    src["base_model_name_or_path"] = "some/model"
    src["use_cayley_neumann"] = True
    c = load_adapter(pair[0])
    out = save_peft_oft(tmp_path / "out", merge([c, c], t=0.5), base_config=src)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "some/model"
    assert cfg["use_cayley_neumann"] is False
    assert (cfg["r"], cfg["oft_block_size"]) == (0, 3)
    assert sorted(cfg["target_modules"]) == ["a", "b"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        "base_model.model.a.oft_R.weight": (4, 3),
        "base_model.model.b.oft_R.weight": (2, 3),
    }


def test_r_configs_round_trip(tmp_path):
    pair = (
        make_adapter(tmp_path / "c", 3, r=2, oft_block_size=0),
        make_adapter(tmp_path / "s", 4, r=2, oft_block_size=0),
    )
    c, s = (load_adapter(p) for p in pair)
    out = save_peft_oft(
        tmp_path / "out", merge([c, s], t=0.0, restore="exact"), base_config=pair[0]
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["oft_block_size"]) == (2, 0)
    np.testing.assert_allclose(peft_outputs(out, X), peft_outputs(pair[0], X), atol=2e-6)


def test_config_that_disagrees_with_the_weights(pair, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(
        (pair[0] / "adapter_model.safetensors").read_bytes()
    )
    cfg = json.loads((pair[0] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "oft_block_size": 2}))
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: key .*oft_R.weight"):
        load_adapter(bad)


def test_reference_adapters_and_scales_are_refused(tmp_path):
    from orthofuse_jax.fusion import from_layers

    rng = np.random.default_rng(0)
    g = rng.standard_normal((2, 2, 3, 3))
    gs = from_layers({"a": (g[0] - g[0].mT, g[1] - g[1].mT)})
    with pytest.raises(AdapterFileError, match=r"not block-diagonal.*bake"):
        save_peft_oft(tmp_path / "o", gs)
    scaled = from_layers({"a": (np.zeros((2, 3, 3)), g[1] - g[1].mT)}, {"a": np.full(6, 1.5)})
    with pytest.raises(AdapterFileError, match=r"no output scale.*bake"):
        save_peft_oft(tmp_path / "o", scaled)
    assert list(tmp_path.iterdir()) == []
