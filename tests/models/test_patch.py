"""patch_unet_params / unpatch_unet_params against dense products, the torch reference processor
and the on-the-fly Flax wrapper (docs/math.md §2)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax.fusion.adapter import from_layers, to_layers, to_orthogonal
from orthofuse_jax.models import (
    attention_layers,
    attention_layers_from_params,
    patch_unet_params,
    unpatch_unet_params,
)

from .conftest import random_adapter, random_inputs, torch_forward


def _leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _forward(unet):
    @jax.jit
    def f(params, x):
        return unet.apply(
            {"params": params},
            x["sample"],
            x["timesteps"],
            x["encoder_hidden_states"],
            {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
        ).sample

    return f


@pytest.fixture(scope="module")
def forward(flax_unet):
    return _forward(flax_unet[0])


@pytest.fixture(scope="module")
def inputs():
    return {k: jnp.asarray(v) for k, v in random_inputs().items()}


def test_table_from_config_matches_params(flax_unet):
    _, params, cfg = flax_unet
    table = attention_layers(cfg)
    assert table == attention_layers_from_params(params)
    # 11 transformer blocks x attn1/attn2 x q/k/v/out
    assert len(table) == 88
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor.to_k_moft"
    spec = table[name]
    assert spec.path == (
        "down_blocks_1",
        "attentions_0",
        "transformer_blocks_1",
        "attn2",
        "to_k",
        "kernel",
    )
    assert (spec.n_in, spec.n_out) == (48, 64)
    out = table["up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor.to_out_moft"]
    assert out.path[-2] == "to_out_0" and (out.n_in, out.n_out) == (32, 32)


def test_sdxl_table_has_560_layers():
    from orthofuse_jax.models.configs import SDXL_BASE_UNET

    table = attention_layers(SDXL_BASE_UNET)
    assert len(table) == 560
    counts = {}
    for s in table.values():
        counts[(s.n_in, s.n_out)] = counts.get((s.n_in, s.n_out), 0) + 1
    # docs/math.md §5: per-n counts; attn2 k/v are 2048 wide
    assert counts == {(640, 640): 60, (1280, 1280): 360, (2048, 640): 20, (2048, 1280): 120}
    assert "mid_block.attentions.0.transformer_blocks.9.attn2.processor.to_out_moft" in table
    assert "up_blocks.0.attentions.2.transformer_blocks.9.attn1.processor.to_q_moft" in table


def test_patch_matches_dense_product(flax_unet):
    _, params, cfg = flax_unet
    table = attention_layers(cfg)
    adapter = random_adapter(table, seed=1)
    patched = patch_unet_params(params, adapter)
    orth = to_orthogonal(adapter)
    for name, (L, R) in to_layers(orth).items():
        # independent dense Q from the element formula of docs/math.md §1.3, float64 numpy
        L, R = np.asarray(L, np.float64), np.asarray(R, np.float64)
        nb, b = L.shape[0], L.shape[-1]
        n = nb * b
        BL, BR = np.zeros((n, n)), np.zeros((n, n))
        for j in range(nb):
            BL[j * b : (j + 1) * b, j * b : (j + 1) * b] = L[j]
            BR[j * b : (j + 1) * b, j * b : (j + 1) * b] = R[j]
        P = np.zeros((n, n))
        for v in range(nb):
            for u in range(b):
                P[v * b + u, u * nb + v] = 1.0
        Q = P.T @ BL @ P @ BR
        K = np.asarray(_get(params, table[name].path), np.float64)
        s = np.asarray(adapter.scales[name], np.float64)
        want = (Q.T @ K) * s[None, :]
        got = np.asarray(_get(patched, table[name].path))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=name)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_identity_adapter_is_bitwise_noop(flax_unet):
    _, params, cfg = flax_unet
    table = attention_layers(cfg)
    layers = {
        n: (np.zeros((4, s.n_in // 4, s.n_in // 4), np.float32),) * 2 for n, s in table.items()
    }
    scales = {n: np.ones(s.n_out, np.float32) for n, s in table.items()}
    for adapter in (from_layers(layers, scales), to_orthogonal(from_layers(layers))):
        patched = patch_unet_params(params, adapter)
        a, b = _leaves_with_paths(params), _leaves_with_paths(patched)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_patch_unpatch_roundtrip_and_no_mutation(flax_unet):
    _, params, cfg = flax_unet
    before = jax.tree_util.tree_map(np.array, params)
    structure = copy.deepcopy(jax.tree_util.tree_structure(params))
    adapter = random_adapter(attention_layers(cfg), seed=2, angle=1.0)
    patched = patch_unet_params(params, adapter)
    restored = unpatch_unet_params(patched, adapter)
    # input untouched, containers not shared
    assert jax.tree_util.tree_structure(params) == structure
    for k, v in _leaves_with_paths(params).items():
        assert np.array_equal(np.asarray(v), _leaves_with_paths(before)[k])
    assert patched is not params and patched["down_blocks_1"] is not params["down_blocks_1"]
    # non-attention leaves are shared (no second copy of the UNet)
    assert patched["conv_in"]["kernel"] is params["conv_in"]["kernel"]
    changed = 0
    for k, v in _leaves_with_paths(params).items():
        r = np.asarray(_leaves_with_paths(restored)[k])
        np.testing.assert_allclose(
            r, np.asarray(v), rtol=0, atol=1e-6 * max(1.0, np.abs(v).max()), err_msg=k
        )
        changed += not np.array_equal(np.asarray(_leaves_with_paths(patched)[k]), np.asarray(v))
    assert changed == 88


def test_patched_matches_onthefly_flax(flax_unet, forward, inputs):
    from orthofuse_jax.models import apply_onthefly

    unet, params, cfg = flax_unet
    adapter = random_adapter(attention_layers(cfg), seed=3)
    patched = forward(patch_unet_params(params, adapter), inputs)

    @jax.jit
    def onthefly(p, a, x):
        return apply_onthefly(
            unet,
            p,
            a,
            x["sample"],
            x["timesteps"],
            x["encoder_hidden_states"],
            {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
            config=cfg,
        ).sample

    ref = onthefly(params, adapter, inputs)
    base = forward(params, inputs)
    rel = float(jnp.linalg.norm(patched - ref) / jnp.linalg.norm(ref))
    assert rel <= 1e-5
    # the adapter matters: patched output is far from the base output
    assert float(jnp.linalg.norm(patched - base) / jnp.linalg.norm(base)) > 1e-3


def test_patched_flax_matches_torch_reference(flax_unet, torch_unet, forward, inputs):
    pytest.importorskip("torch")
    from .torch_reference import install

    unet, params, cfg = flax_unet
    adapter = random_adapter(attention_layers(cfg), seed=4, angle=0.8)
    layers = {n: (np.asarray(L), np.asarray(R)) for n, (L, R) in to_layers(adapter).items()}
    scales = {n: np.asarray(s) for n, s in adapter.scales.items()}
    x = random_inputs()
    tm = copy.deepcopy(torch_unet)
    base_t = torch_forward(tm, x)
    install(tm, layers, scales)
    ref = torch_forward(tm, x)
    got = np.asarray(forward(patch_unet_params(params, adapter), inputs))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel
    assert np.linalg.norm(ref - base_t) / np.linalg.norm(base_t) > 1e-3
    # the unpatched Flax model matches the plain torch model
    base_f = np.asarray(forward(params, inputs))
    assert np.linalg.norm(base_f - base_t) / np.linalg.norm(base_t) <= 1e-5


def test_mismatches_name_the_layer(flax_unet):
    _, params, cfg = flax_unet
    table = attention_layers(cfg)
    name = "mid_block.attentions.0.transformer_blocks.1.attn2.processor.to_v_moft"
    good = random_adapter(table, seed=5)
    layers, scales = (
        {n: (np.asarray(L), np.asarray(R)) for n, (L, R) in to_layers(good).items()},
        dict(good.scales),
    )

    wrong_n = dict(layers)
    wrong_n[name] = (np.zeros((4, 16, 16), np.float32),) * 2  # n=64, kernel in-dim 48
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        patch_unet_params(params, from_layers(wrong_n, scales))

    wrong_s = dict(scales)
    wrong_s[name] = np.ones(48, np.float32)  # out-dim is 64
    with pytest.raises(ValueError, match="scale"):
        patch_unet_params(params, from_layers(layers, wrong_s))

    extra = dict(layers)
    bad = "down_blocks.0.attentions.0.transformer_blocks.5.attn1.processor.to_q_moft"
    extra[bad] = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_moft"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.5"):
        patch_unet_params(params, from_layers(extra, scales))

    missing_path = {k: v for k, v in params.items() if k != "mid_block"}
    with pytest.raises(ValueError, match=r"mid_block.*missing"):
        patch_unet_params(missing_path, good, config=cfg)

    nan = dict(layers)
    nan[name] = (np.full((4, 12, 12), np.nan, np.float32), layers[name][1])
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*non-finite"):
        patch_unet_params(params, from_layers(nan, scales))


def test_subset_adapter_and_frozendict(flax_unet):
    from flax.core import freeze

    _, params, cfg = flax_unet
    table = attention_layers(cfg)
    sub = {n: s for n, s in table.items() if ".attn2." in n}
    adapter = random_adapter(sub, seed=6, scales=False)
    patched = patch_unet_params(freeze(params), adapter)
    for n, s in table.items():
        same = np.array_equal(np.asarray(_get(patched, s.path)), np.asarray(_get(params, s.path)))
        assert same == (n not in sub), n
