"""LyCORIS ``diag-oft`` / kohya OFT files read as output-side GS adapters: the effective rotations
against the ``lycoris`` package and a float64 transcription of kohya's ``get_weight``, name
decoding against diffusers' own SGM conversion, and the errors (bad files, mixed sides, BOFT)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from lycoris.functional.diag_oft import get_r
from safetensors.numpy import save_file

from orthofuse_jax.fusion import AdapterFileError, from_layers, load_adapter, merge, save_adapter
from orthofuse_jax.fusion.io import check_pair
from orthofuse_jax.fusion.lycoris import (
    KOHYA_OFT,
    LYCORIS_OFT,
    decode_module_name,
    is_lycoris_oft,
    load_lycoris_oft,
    lycoris_format,
    save_lycoris_oft,
)
from orthofuse_jax.geometry import cayley

logging.getLogger("LyCORIS").setLevel(logging.WARNING)
ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
LORA = "lycoris_" + ATTN.replace(".", "_")


def blocks(seed, shape=(4, 3, 3), scale=0.4):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def write(path, tensors):
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def lyco_file(path, seed, alpha=0.0, shape=(4, 3, 3), name=LORA):
    return write(
        path, {f"{name}.oft_blocks": blocks(seed, shape), f"{name}.alpha": np.float32(alpha)}
    )


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.05])
def test_rotation_equals_lycoris_get_r(tmp_path, alpha):
    f = lyco_file(tmp_path / "a.safetensors", 0, alpha)
    a = load_adapter(f)  # detected by content
    assert a.side == "output" and a.layer_names == (ATTN,)
    ours = np.asarray(cayley(np.asarray(a.stacks["nb4_b3"].R[0], np.float64)))
    oft = torch.from_numpy(blocks(0))
    theirs = get_r(oft, torch.eye(3), alpha * 12).numpy()  # float32, as lycoris computes it
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    np.testing.assert_allclose(np.asarray(a.stacks["nb4_b3"].L), 0)


def kohya_r(oft, alpha):
    """kohya sd-scripts ``OFTModule.get_weight`` (multiplier 1) transcribed in float64."""
    q = oft - np.swapaxes(oft, 1, 2)
    norm = np.linalg.norm(q.ravel())
    q = q * ((min(norm, alpha * oft.shape[0] * oft.shape[1]) + 1e-8) / (norm + 1e-8))
    eye = np.eye(oft.shape[-1])
    return (eye + q) @ np.linalg.inv(eye - q)


@pytest.mark.parametrize("alpha", [1e-3, 10.0])
def test_kohya_sgm_file(tmp_path, alpha):
    name = "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    f = write(
        tmp_path / "k.safetensors",
        {f"{name}.oft_blocks": blocks(3), f"{name}.alpha": np.float32(alpha)},
    )
    a = load_lycoris_oft(f)
    assert a.layer_names == (ATTN,)
    ours = np.asarray(cayley(np.asarray(a.stacks["nb4_b3"].R[0], np.float64)))
    np.testing.assert_allclose(ours, kohya_r(blocks(3).astype(np.float64), alpha), atol=1e-6)


SGM = [
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "input_blocks_8_1_transformer_blocks_1_attn2_to_out_0",
    "input_blocks_3_0_op",
    "input_blocks_1_0_emb_layers_1",
    "middle_block_1_transformer_blocks_9_ff_net_2",
    "middle_block_2_out_layers_3",
    "output_blocks_0_1_proj_in",
    "output_blocks_5_1_transformer_blocks_0_attn2_to_k",
    "output_blocks_2_2_conv",
    "output_blocks_7_0_skip_connection",
]


def test_sgm_names_follow_diffusers_conversion():
    sd = {f"lora_unet_{k}.lora_down.weight": 0 for k in SGM}
    mapped = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    rename = {
        "input_blocks": "down_blocks",
        "middle_block": "mid_block",
        "output_blocks": "up_blocks",
    }
    theirs = []
    for k in mapped:
        k = k.removeprefix("lora_unet_").removesuffix(".lora_down.weight")
        for old, new in rename.items():
            k = k.replace(old, new)
        # convert_ldm_unet_checkpoint: input_blocks.i.0.op -> down_blocks.j.downsamplers.0.conv
        theirs.append(k.replace("downsamplers_0_op", "downsamplers_0_conv"))
    resnet = {
        "emb_layers_1": "time_emb_proj",
        "out_layers_3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    ours = []
    for k in SGM:
        d = decode_module_name(k)
        for old, new in resnet.items():  # diffusers' LoRA map renames block prefixes only
            d = d.replace(new, old.replace("_", "."))
        ours.append(d.replace(".", "_"))
    assert sorted(ours) == sorted(theirs)
    assert decode_module_name(SGM[0]) == ATTN
    assert (
        decode_module_name(SGM[1])
        == "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0"
    )
    assert decode_module_name(SGM[4]) == "mid_block.attentions.0.transformer_blocks.9.ff.net.2"
    assert decode_module_name(SGM[9]) == "up_blocks.2.resnets.1.conv_shortcut"


def test_decode_against_module_names():
    names = ["blocks.my_layer", "blocks.my.layer2"]
    assert decode_module_name("blocks_my_layer", names) == "blocks.my_layer"
    with pytest.raises(ValueError, match="ambiguous"):
        decode_module_name("a_b_c", ["a.b_c", "a_b.c"])


def test_formats():
    assert is_lycoris_oft({"lycoris_x.oft_blocks": 0}) and not is_lycoris_oft({"x.oft_r": 0})
    assert lycoris_format({"oft_unet_x.oft_blocks": 0}) == KOHYA_OFT
    assert lycoris_format({"lora_unet_x.oft_blocks": 0}) == LYCORIS_OFT


@pytest.mark.parametrize(
    "tensors, match",
    [
        (
            {"lycoris_a.oft_blocks": np.full((2, 2, 2), np.nan), "lycoris_a.alpha": 0.0},
            "'lycoris_a.oft_blocks': non-finite",
        ),
        ({"lycoris_a.oft_blocks": np.zeros((2, 2, 2))}, "'lycoris_a.alpha' is missing"),
        (
            {
                "lycoris_a.alpha": 0.0,
                "lycoris_b.oft_blocks": np.zeros((2, 2, 2)),
                "lycoris_b.alpha": 0.0,
            },
            "'lycoris_a.oft_blocks' is missing",
        ),
        (
            {"lycoris_a.oft_blocks": np.zeros((2, 2, 3)), "lycoris_a.alpha": 0.0},
            r"shape \[2, 2, 3\] is not \[k, b, b\]",
        ),
        (
            {"lycoris_a.oft_blocks": np.zeros((3, 2, 2, 2)), "lycoris_a.alpha": 0.0},
            "BOFT with m=2 butterfly stages over 2 blocks of 2 is not a GS matrix",
        ),
        (
            {
                "lycoris_a.oft_blocks": np.zeros((2, 2, 2)),
                "lycoris_a.alpha": 0.0,
                "lycoris_a.rescale": np.ones((3, 1)),
            },
            r"'lycoris_a.rescale': shape \[3, 1\]",
        ),
        (
            {
                "lycoris_a.oft_blocks": np.zeros((2, 2, 2)),
                "lycoris_a.alpha": 0.0,
                "lycoris_a.lora_up": np.ones(2),
            },
            "'lycoris_a.lora_up': unexpected key",
        ),
    ],
)
def test_bad_files(tmp_path, tensors, match):
    f = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(AdapterFileError, match=str(f) + ".*" + match):
        load_adapter(f)


def test_mixed_block_sizes_and_sides(tmp_path):
    fa = lyco_file(tmp_path / "a.safetensors", 0)
    fb = lyco_file(tmp_path / "b.safetensors", 1, shape=(2, 6, 6))
    with pytest.raises(
        AdapterFileError, match=f"{fb}.*{ATTN}.*blocks \\(2, 6, 6\\).*{fa}.*\\(4, 3, 3\\)"
    ):
        check_pair([load_adapter(fa), load_adapter(fb)], [fa, fb])
    z = np.zeros((4, 3, 3), np.float32)
    inp = from_layers({ATTN: (z, z)})
    with pytest.raises(
        AdapterFileError, match=f"in.safetensors rotates the layers' input features, {fa}"
    ):
        check_pair([load_adapter(fa), inp], [fa, tmp_path / "in.safetensors"])
    with pytest.raises(ValueError, match="output features"):
        merge([load_adapter(fa), inp], t=0.5)


def test_writers_refuse_the_other_side(tmp_path):
    a = load_adapter(lyco_file(tmp_path / "a.safetensors", 0))
    with pytest.raises(AdapterFileError, match="reference format cannot express"):
        save_adapter(tmp_path / "r.safetensors", a)
    assert not (tmp_path / "r.safetensors").exists()
    z = np.zeros((4, 3, 3), np.float32)
    with pytest.raises(AdapterFileError, match="input features"):
        save_lycoris_oft(tmp_path / "o.safetensors", from_layers({ATTN: (z, z)}))
    notI = from_layers({ATTN: (blocks(5), z)}, side="output")
    with pytest.raises(AdapterFileError, match="L differs from the identity"):
        save_lycoris_oft(tmp_path / "o.safetensors", notI)
    assert not (tmp_path / "o.safetensors").exists()


def test_kohya_write_keeps_rotation(tmp_path):
    """kohya's constraint is always on: the written alpha must leave q unscaled."""
    name = "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    f = write(
        tmp_path / "k.safetensors",
        {f"{name}.oft_blocks": blocks(3), f"{name}.alpha": np.float32(10.0)},
    )
    a = load_lycoris_oft(f)
    out = save_lycoris_oft(tmp_path / "o.safetensors", merge([a, a], t=0.5), template=f, inputs=[f])
    from safetensors.numpy import load_file

    t = load_file(str(out))
    assert set(t) == {f"{name}.oft_blocks", f"{name}.alpha"} and t[f"{name}.alpha"].shape == ()
    got = kohya_r(t[f"{name}.oft_blocks"].astype(np.float64), float(t[f"{name}.alpha"]))
    np.testing.assert_allclose(got, kohya_r(blocks(3).astype(np.float64), 10.0), atol=1e-5)
