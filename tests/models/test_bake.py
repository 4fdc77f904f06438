"""``bake_unet`` / ``orthofuse-jax bake``: the adapter folded into a diffusers UNet folder's torch
weights, checked against dense products, the torch reference processor on the original folder, and
diffusers' own loader (docs/math.md §2)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import numpy as np
import pytest

from orthofuse_jax._safetensors import SafetensorsFile
from orthofuse_jax.cli import main
from orthofuse_jax.fusion.adapter import from_layers, to_layers, to_orthogonal
from orthofuse_jax.fusion.io import save_adapter
from orthofuse_jax.models import attention_layers
from orthofuse_jax.models.bake import bake_unet, weight_key
from orthofuse_jax.models.configs import TINY_SDXL_UNET

from .conftest import random_adapter, random_inputs, torch_forward

torch = pytest.importorskip("torch")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def dense_q(L, R):
    """``Q = P^T BD(L) P BD(R)`` in float64 from the element formula of docs/math.md §1.3."""
    L, R = np.asarray(L, np.float64), np.asarray(R, np.float64)
    nb, b = L.shape[0], L.shape[-1]
    n = nb * b
    BL, BR, P = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for j in range(nb):
        BL[j * b : (j + 1) * b, j * b : (j + 1) * b] = L[j]
        BR[j * b : (j + 1) * b, j * b : (j + 1) * b] = R[j]
    for v in range(nb):
        for u in range(b):
            P[v * b + u, u * nb + v] = 1.0
    return P.T @ BL @ P @ BR


def read_all(path, raw=False):
    """``{key: array}`` of a safetensors file (``raw``: the stored dtype, BF16 as uint16)."""
    with SafetensorsFile(path) as f:
        if not raw:
            return {k: f.read(k) for k in f.entries}, {k: f.entries[k][0] for k in f.entries}
        out = {}
        for k, (dt, shape, _) in f.entries.items():
            a = np.empty(shape, {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[dt])
            f.read_into(k, a)
            out[k] = a
        return out, {k: f.entries[k][0] for k in f.entries}


def forward(model):
    return torch_forward(model, random_inputs())


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def snapshot(*folders):
    """Bytes and mtimes of every file under ``folders`` (inputs must not change)."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = (f.read(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(attention_layers(TINY_SDXL_UNET), seed=11, angle=0.8)


@pytest.fixture(scope="module")
def adapter_file(adapter, tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("bake_adapter") / "a.safetensors", adapter)


@pytest.fixture(scope="module")
def reference(torch_unet, adapter):
    """The torch UNet of the original folder with the reference's on-the-fly GS processor."""
    from .torch_reference import install

    layers = {n: (np.asarray(L), np.asarray(R)) for n, (L, R) in to_layers(adapter).items()}
    scales = {n: np.asarray(s) for n, s in adapter.scales.items()}
    return forward(install(copy.deepcopy(torch_unet), layers, scales))


@pytest.fixture(scope="module")
def baked32(tiny_unet_dir, adapter_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bake32") / "unet"
    # the model root (unet/ inside) and the adapter file, as the command line gets them
    res = bake_unet(tiny_unet_dir.parent, adapter_file, out)
    assert res.layers == 88 and res.unet_dir == tiny_unet_dir
    return out


def test_fp32_bake_matches_reference_processor(baked32, tiny_unet_dir, torch_unet, reference):
    from diffusers import UNet2DConditionModel

    assert sorted(os.listdir(baked32)) == ["config.json", WEIGHTS]
    assert (baked32 / "config.json").read_bytes() == (tiny_unet_dir / "config.json").read_bytes()
    model = UNet2DConditionModel.from_pretrained(baked32).eval()
    got = forward(model)
    assert rel(got, reference) <= 1e-5, rel(got, reference)
    base = forward(torch_unet)
    assert rel(reference, base) > 1e-3  # the adapter matters


def test_fp32_bake_is_the_dense_fold(baked32, tiny_unet_dir, adapter):
    """W_eff = diag(s) W Q with a dense float64 Q; every other tensor (biases too) bit for bit."""
    src, src_dt = read_all(tiny_unet_dir / WEIGHTS)
    got, got_dt = read_all(baked32 / WEIGHTS)
    assert list(got) == list(src) and set(got_dt.values()) == {"F32"}
    with SafetensorsFile(baked32 / WEIGHTS) as f:
        assert f.metadata["format"] == "pt"
    orth = to_layers(to_orthogonal(adapter))
    folded = set()
    for name, (L, R) in orth.items():
        key = weight_key(name)
        W = src[key].astype(np.float64)
        want = np.asarray(adapter.scales[name], np.float64)[:, None] * (W @ dense_q(L, R))
        np.testing.assert_allclose(got[key], want, rtol=0, atol=2e-6 * np.abs(want).max())
        folded.add(key)
    assert len(folded) == 88
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in folded
    for key in set(src) - folded:
        assert np.array_equal(got[key], src[key]), key


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_bake_is_the_fp32_bake_rounded(
    dtype, baked32, tiny_unet_dir, adapter_file, reference, tmp_path
):
    import ml_dtypes
    from diffusers import UNet2DConditionModel

    out = tmp_path / "unet16"
    bake_unet(tiny_unet_dir, adapter_file, out, dtype)  # the UNet folder itself
    f32, _ = read_all(baked32 / WEIGHTS)
    got, dts = read_all(out / WEIGHTS, raw=True)
    tag, np_dtype = {"fp16": ("F16", np.float16), "bf16": ("BF16", ml_dtypes.bfloat16)}[dtype]
    assert set(dts.values()) == {tag}
    for key, x in f32.items():
        want = x.astype(np_dtype).view(got[key].dtype)
        assert np.array_equal(got[key], want), key
    if dtype == "fp16":
        model = UNet2DConditionModel.from_pretrained(out).float().eval()
        assert rel(forward(model), reference) <= 1e-2


def test_fp16_only_input_folder(tiny_unet_dir, adapter_file, reference, tmp_path):
    """A folder with only diffusion_pytorch_model.fp16.safetensors (the usual download)."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file

    from orthofuse_jax.models import load_unet
    from orthofuse_jax.models._backbone import weight_files

    src, _ = read_all(tiny_unet_dir / WEIGHTS)
    fp16 = tmp_path / "sdxl" / "unet"
    fp16.mkdir(parents=True)
    shutil.copyfile(tiny_unet_dir / "config.json", fp16 / "config.json")
    save_file(
        {k: v.astype(np.float16) for k, v in src.items()},
        str(fp16 / "diffusion_pytorch_model.fp16.safetensors"),
        metadata={"format": "pt"},
    )
    assert weight_files(str(fp16)) == [str(fp16 / "diffusion_pytorch_model.fp16.safetensors")]
    _, params, _ = load_unet(fp16.parent)  # the Flax loader finds the variant too
    np.testing.assert_array_equal(
        np.asarray(params["conv_in"]["kernel"], np.float32),
        np.transpose(src["conv_in.weight"].astype(np.float16), (2, 3, 1, 0)),
    )
    out = tmp_path / "baked"
    res = bake_unet(fp16.parent, adapter_file, out)  # default dtype: the input's
    assert res.dtypes == {"F16": len(src)}
    _, dts = read_all(out / WEIGHTS)
    assert set(dts.values()) == {"F16"}
    model = UNet2DConditionModel.from_pretrained(out).float().eval()
    assert rel(forward(model), reference) <= 1e-2


def _toy_unet(folder, rng):
    """A hand-made 'UNet folder': one attention with biased to_q and to_out.0 (diffusers' UNet has
    no q/k/v bias, but the reference processor scales one; bake follows the reference)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "Toy"}))
    a = "mid_block.attentions.0.transformer_blocks.0.attn1"
    t = {
        f"{a}.to_q.weight": rng.standard_normal((6, 12)).astype(np.float32),
        f"{a}.to_q.bias": rng.standard_normal(6).astype(np.float32),
        f"{a}.to_out.0.weight": rng.standard_normal((12, 12)).astype(np.float32),
        f"{a}.to_out.0.bias": rng.standard_normal(12).astype(np.float32),
        "conv_in.weight": rng.standard_normal((3, 4, 1, 1)).astype(np.float32),
    }
    save_file(t, str(folder / WEIGHTS), metadata={"format": "pt"})
    return a, t


def _blocks(rng, nb=3, b=4):
    A = rng.standard_normal((2, nb, b, b)) * 0.5
    A = (A - np.swapaxes(A, -1, -2)) / 2
    return A[0].astype(np.float32), A[1].astype(np.float32)


def test_biases_follow_the_reference_and_peft_names(tmp_path):
    rng = np.random.default_rng(3)
    a, t = _toy_unet(tmp_path / "toy", rng)
    q, o = f"{a}.processor.to_q_moft", f"{a}.processor.to_out_moft"
    layers = {q: _blocks(rng), o: _blocks(rng)}
    scales = {q: rng.uniform(0.5, 1.5, 6).astype(np.float32), o: rng.uniform(0.5, 1.5, 12)}
    adapter = from_layers(layers, scales)
    bake_unet(tmp_path / "toy", adapter, tmp_path / "out")
    got, _ = read_all(tmp_path / "out" / WEIGHTS)
    orth = to_layers(to_orthogonal(adapter))
    for name, proj in ((q, "to_q"), (o, "to_out.0")):
        W = t[f"{a}.{proj}.weight"].astype(np.float64)
        want = np.asarray(scales[name], np.float64)[:, None] * (W @ dense_q(*orth[name]))
        np.testing.assert_allclose(got[f"{a}.{proj}.weight"], want, atol=1e-5)
    # q = q_scale * to_q(Q x): the to_q bias is scaled; out = out_scale * (W Q o) + b: kept
    np.testing.assert_allclose(got[f"{a}.to_q.bias"], scales[q] * t[f"{a}.to_q.bias"], rtol=1e-6)
    assert np.array_equal(got[f"{a}.to_out.0.bias"], t[f"{a}.to_out.0.bias"])
    assert np.array_equal(got["conv_in.weight"], t["conv_in.weight"])

    # PEFT module names (what load_adapter returns for a PEFT OFT file): biases kept
    peft = from_layers(
        {f"{a}.to_q": layers[q], f"unet.{a}.to_out.0": layers[o]},
        {f"{a}.to_q": scales[q]},
    )
    bake_unet(tmp_path / "toy", peft, tmp_path / "out_peft")
    got, _ = read_all(tmp_path / "out_peft" / WEIGHTS)
    W = t[f"{a}.to_q.weight"].astype(np.float64)
    want = np.asarray(scales[q], np.float64)[:, None] * (W @ dense_q(*orth[q]))
    np.testing.assert_allclose(got[f"{a}.to_q.weight"], want, atol=1e-5)
    W = t[f"{a}.to_out.0.weight"].astype(np.float64)
    np.testing.assert_allclose(got[f"{a}.to_out.0.weight"], W @ dense_q(*orth[o]), atol=1e-5)
    assert np.array_equal(got[f"{a}.to_q.bias"], t[f"{a}.to_q.bias"])


# ------------------------------------------------------------------------------------------------ bad input


def _bad(capsys, argv, *needles):
    rc = main([str(x) for x in argv])
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("orthofuse-jax bake: error: "), err
    for n in needles:
        assert str(n) in err, err
    return err


@pytest.fixture()
def inputs_unchanged(tiny_unet_dir):
    before = snapshot(tiny_unet_dir)
    yield
    assert snapshot(tiny_unet_dir) == before


def _no_leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_unknown_layer(capsys, tmp_path, adapter, tiny_unet_dir, inputs_unchanged):
    bad = "down_blocks.0.attentions.0.transformer_blocks.5.attn1.processor.to_q_moft"
    good = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_moft"
    layers = {n: tuple(np.asarray(x) for x in lr) for n, lr in to_layers(adapter).items()}
    layers[bad] = layers[good]
    f = save_adapter(tmp_path / "extra.safetensors", from_layers(layers, adapter.scales))
    out = tmp_path / "out"
    _bad(
        capsys,
        ["bake", "--model", tiny_unet_dir.parent, "--adapter", f, "-o", out],
        f,
        repr(bad),
        "matches no UNet weight",
        repr(weight_key(bad)),
    )
    assert not out.exists() and not _no_leftovers(tmp_path)


def test_shape_mismatch(capsys, tmp_path, adapter, tiny_unet_dir, inputs_unchanged):
    name = "mid_block.attentions.0.transformer_blocks.1.attn2.processor.to_v_moft"
    layers = {n: tuple(np.asarray(x) for x in lr) for n, lr in to_layers(adapter).items()}
    layers[name] = (np.zeros((4, 16, 16), np.float32),) * 2  # n = 64; the weight's in = 48
    f = save_adapter(tmp_path / "wide.safetensors", from_layers(layers, adapter.scales))
    out = tmp_path / "out"
    key = "mid_block.attentions.0.transformer_blocks.1.attn2.to_v.weight"
    _bad(
        capsys,
        ["bake", "--model", tiny_unet_dir, "--adapter", f, "-o", out, "--dtype", "fp16"],
        tiny_unet_dir / WEIGHTS,
        repr(key),
        "[64, 48]",
        "n = 4 x 16 = 64",
        repr(name),
    )
    assert not out.exists() and not _no_leftovers(tmp_path)


def test_existing_output_and_overwrite(
    capsys, tmp_path, adapter_file, tiny_unet_dir, inputs_unchanged
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    _bad(
        capsys,
        ["bake", "--model", tiny_unet_dir, "--adapter", adapter_file, "-o", out],
        out,
        "exists",
        "--overwrite",
    )
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "{}"
    rc = main(["bake", "--model", str(tiny_unet_dir), "--adapter", str(adapter_file)]
              + ["-o", str(out), "--overwrite"])  # fmt: skip
    assert rc == 0 and sorted(os.listdir(out)) == ["config.json", WEIGHTS]
    assert "folded 88 adapter layers" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    _bad(
        capsys,
        ["bake", "--model", tiny_unet_dir, "--adapter", adapter_file, "-o", out, "--overwrite"],
        "notes.txt",
    )
    assert (out / "notes.txt").read_text() == "mine"
    _bad(  # the input folder itself
        capsys,
        ["bake", "--model", tiny_unet_dir, "--adapter", adapter_file]
        + ["-o", tiny_unet_dir, "--overwrite"],
        "refusing to overwrite an input",
    )
    assert not _no_leftovers(tmp_path) and not _no_leftovers(tiny_unet_dir.parent)


def test_missing_unet_config(capsys, tmp_path, adapter_file):
    (tmp_path / "empty" / "unet").mkdir(parents=True)
    _bad(
        capsys,
        ["bake", "--model", tmp_path / "empty", "--adapter", adapter_file, "-o", tmp_path / "o"],
        tmp_path / "empty" / "unet" / "config.json",
    )
    _bad(
        capsys,
        ["bake", "--model", tmp_path / "nope", "--adapter", adapter_file, "-o", tmp_path / "o"],
        tmp_path / "nope",
    )
    assert not (tmp_path / "o").exists()


def test_unknown_dtype(capsys, tmp_path, tiny_unet_dir, adapter_file):
    with pytest.raises(SystemExit) as e:
        main(["bake", "--model", str(tiny_unet_dir), "--adapter", str(adapter_file)]
             + ["-o", str(tmp_path / "o"), "--dtype", "fp8"])  # fmt: skip
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bake_unet(tiny_unet_dir, adapter_file, tmp_path / "o", "fp8")
    assert not (tmp_path / "o").exists()


def test_bake_needs_neither_flax_nor_diffusers(tmp_path, tiny_unet_dir, adapter_file):
    import subprocess

    code = (
        "import sys; from orthofuse_jax.cli import main; "
        f"rc = main(['bake', '--model', {str(tiny_unet_dir)!r}, '--adapter', {str(adapter_file)!r}, "
        f"'-o', {str(tmp_path / 'o')!r}]); "
        "bad = [m for m in ('flax', 'diffusers', 'torch', 'transformers') if m in sys.modules]; "
        "assert rc == 0 and not bad, (rc, bad)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    assert (tmp_path / "o" / WEIGHTS).is_file()


# ------------------------------------------------------------------------------------ --single-file


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_file_loads_as_the_baked_folder(dtype, tiny_unet_dir, adapter_file, tmp_path):
    """diffusers' own single-file loader reads our original-layout file to the folder's weights."""
    from diffusers import UNet2DConditionModel

    out, single = tmp_path / "unet", tmp_path / "sdxl_unet.safetensors"
    res = bake_unet(tiny_unet_dir.parent, adapter_file, out, dtype, single_file=single)
    assert res.single_file == single and sorted(os.listdir(tmp_path)) == [single.name, "unet"]
    folder, folder_dt = read_all(out / WEIGHTS, raw=True)
    flat, flat_dt = read_all(single, raw=True)
    assert len(flat) == len(folder) and all(k.startswith("model.diffusion_model.") for k in flat)
    assert set(flat_dt.values()) == set(folder_dt.values()) == {"F32" if dtype == "fp32" else "F16"}
    # the original SDXL names of a tiny UNet with one resnet per down block
    attn = "transformer_blocks.0.attn1.to_q.weight"
    assert np.array_equal(
        flat[f"model.diffusion_model.input_blocks.1.1.{attn}"],
        folder[f"down_blocks.0.attentions.0.{attn}"],
    )
    assert np.array_equal(
        flat["model.diffusion_model.label_emb.0.0.weight"], folder["add_embedding.linear_1.weight"]
    )
    assert sorted(a.tobytes() for a in flat.values()) == sorted(
        a.tobytes() for a in folder.values()
    )
    want = _state(UNet2DConditionModel.from_pretrained(out))
    got = _state(
        UNet2DConditionModel.from_single_file(str(single), config=str(out), local_files_only=True)
    )
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def test_original_keys_of_sdxl_base():
    """Known keys of the released SDXL base checkpoint, from the full-size UNet's key set."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from orthofuse_jax.models import original_unet_keys
    from orthofuse_jax.models.configs import SDXL_BASE_UNET

    with init_empty_weights():
        model = UNet2DConditionModel(**SDXL_BASE_UNET)
    names = original_unet_keys(dict(model.config), model.state_dict(), "sdxl")
    assert len(set(names.values())) == len(names) == 1680
    known = {
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
        "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight": (
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
        ),
        "down_blocks.2.attentions.1.proj_in.weight": "input_blocks.8.1.proj_in.weight",
        "mid_block.resnets.1.norm1.weight": "middle_block.2.in_layers.0.weight",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2.bias": (
            "middle_block.1.transformer_blocks.9.ff.net.2.bias"
        ),
        "up_blocks.2.resnets.2.conv_shortcut.weight": "output_blocks.8.0.skip_connection.weight",
        "up_blocks.0.resnets.0.time_emb_proj.weight": "output_blocks.0.0.emb_layers.1.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
        "time_embedding.linear_1.weight": "time_embed.0.weight",
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.weight": "out.2.weight",
    }
    for key, orig in known.items():
        assert names[key] == "model.diffusion_model." + orig, key


def test_single_file_bad_outputs(
    capsys, tmp_path, adapter_file, tiny_unet_dir, inputs_unchanged, monkeypatch
):
    base = ["bake", "--model", tiny_unet_dir, "--adapter", adapter_file, "-o"]
    out, single = tmp_path / "out", tmp_path / "u.safetensors"
    single.write_bytes(b"mine")
    _bad(capsys, [*base, out, "--single-file", single], single, "exists", "--overwrite")
    assert not out.exists() and single.read_bytes() == b"mine"
    _bad(capsys, [*base, out, "--single-file", tmp_path / "u.ckpt"], "u.ckpt", ".safetensors")
    _bad(capsys, [*base, out, "--single-file", tmp_path / "no" / "u.safetensors"], "does not exist")
    _bad(capsys, [*base, out, "--single-file", out / "u.safetensors"], "inside the output folder")
    _bad(capsys, [*base, out, "--single-file", tiny_unet_dir / WEIGHTS, "--overwrite"], "input")
    (tmp_path / "d.safetensors").mkdir()
    _bad(
        capsys,
        [*base, out, "--single-file", tmp_path / "d.safetensors", "--overwrite"],
        "not a file",
    )
    for name in ("diffusers", "diffusers.loaders"):  # as if diffusers were not installed
        monkeypatch.setitem(sys.modules, name, None)
    _bad(capsys, [*base, out, "--single-file", tmp_path / "n.safetensors"], "diffusers", "[sdxl]")
    monkeypatch.undo()
    assert not out.exists() and not _no_leftovers(tmp_path)
    assert main([str(x) for x in [*base, out, "--single-file", single, "--overwrite"]]) == 0
    assert f"and {single}" in capsys.readouterr().out
    with SafetensorsFile(single) as f:
        assert len(f.entries) == len(read_all(out / WEIGHTS)[0])
    assert not _no_leftovers(tmp_path)
