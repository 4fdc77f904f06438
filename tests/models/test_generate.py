"""Euler sampling against diffusers' torch scheduler and UNet; the generate CLI end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from orthofuse_jax.models import MissingModelFileError, attention_layers, euler_schedule, load_unet
from orthofuse_jax.models.generate import denoise

from .conftest import TEXT_EMBED_DIM, TINY_UNET, random_adapter

SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    timestep_spacing="leading",
    steps_offset=1,
    prediction_type="epsilon",
    interpolation_type="linear",
)


@pytest.mark.parametrize("steps", [50, 7])
def test_euler_schedule_matches_diffusers(steps):
    pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    ref.set_timesteps(steps)
    got = euler_schedule(steps, **SDXL_SCHEDULER)
    np.testing.assert_allclose(got.timesteps, ref.timesteps.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(
        got.sigmas, ref.sigmas.numpy(), rtol=1e-5
    )  # diffusers: float32 betas
    np.testing.assert_allclose(got.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-5)
    if steps == 50:
        assert got.timesteps[0] == 981 and got.timesteps[-1] == 1


def test_denoise_matches_torch_euler_cfg(flax_unet, torch_unet):
    """Two Euler steps with CFG: our jitted JAX loop vs diffusers' torch UNet + EulerDiscreteScheduler."""
    torch = pytest.importorskip("torch")
    from diffusers import EulerDiscreteScheduler

    unet, params, _ = flax_unet
    rng = np.random.default_rng(7)
    pe = rng.standard_normal((5, TINY_UNET["cross_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal(TEXT_EMBED_DIM).astype(np.float32)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    g = 5.0
    got = np.asarray(
        denoise(
            unet,
            params,
            pe,
            pooled,
            height=64,
            width=64,
            num_steps=2,
            guidance_scale=g,
            latents=noise,
            progress=False,
        )
    )

    sched = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    sched.set_timesteps(2)
    x = torch.tensor(noise) * sched.init_noise_sigma
    ctx = torch.tensor(np.stack([np.zeros_like(pe), pe]))
    text = torch.tensor(np.stack([np.zeros_like(pooled), pooled]))
    tids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps = torch_unet(
                inp, t, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": tids}
            ).sample
            eu, ec = eps.chunk(2)
            x = sched.step(eu + g * (ec - eu), t, x).prev_sample
    ref = x.numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-4


def _write_reference_adapter(path, adapter):
    from safetensors.numpy import save_file

    from orthofuse_jax.fusion.adapter import SCALE_NAME, to_layers

    tensors = {}
    for name, (L, R) in to_layers(adapter).items():
        tensors[f"{name}.ort_monarch.L"] = np.asarray(L, np.float32)
        tensors[f"{name}.ort_monarch.R"] = np.asarray(R, np.float32)
        proc, _, layer = name.rpartition(".")
        tensors[f"{proc}.{SCALE_NAME[layer]}"] = np.asarray(adapter.scales[name], np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_generate_cli_writes_png(tiny_model_dir, tmp_path, flax_unet):
    from PIL import Image

    from orthofuse_jax.cli import main

    rng = np.random.default_rng(0)
    emb = tmp_path / "emb.npz"
    np.savez(
        emb,
        prompt_embeds=rng.standard_normal((1, 5, 48)).astype(np.float32),
        pooled=rng.standard_normal((1, TEXT_EMBED_DIM)).astype(np.float32),
    )
    adapter_path = tmp_path / "fused.safetensors"
    _write_reference_adapter(adapter_path, random_adapter(attention_layers(flax_unet[2]), seed=9))
    out = tmp_path / "out.png"
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(adapter_path),
            "--embeddings",
            str(emb),
            "--prompt",
            "a <dog6> dog in <style> style",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--no-progress",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    img = Image.open(out)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.text["prompt"] == "a <dog6> dog in <style> style"
    arr = np.asarray(img)
    assert arr.std() > 0


def test_missing_model_files_are_named(tmp_path, tiny_unet_dir):
    with pytest.raises(MissingModelFileError, match="does not exist"):
        load_unet(tmp_path / "nope")
    (tmp_path / "m" / "unet").mkdir(parents=True)
    with pytest.raises(MissingModelFileError, match=r"unet/config\.json"):
        load_unet(tmp_path / "m")
    (tmp_path / "m" / "unet" / "config.json").write_text(
        (tiny_unet_dir / "config.json").read_text()
    )
    with pytest.raises(MissingModelFileError, match=r"diffusion_pytorch_model\.safetensors"):
        load_unet(tmp_path / "m")


def test_corrupt_weights_are_named(tmp_path, tiny_unet_dir):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(tiny_unet_dir / "diffusion_pytorch_model.safetensors"))
    key = "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text((tiny_unet_dir / "config.json").read_text())
    bad = dict(sd)
    bad[key] = np.full_like(sd[key], np.inf)
    save_file(bad, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*non-finite"):
        load_unet(d)
    bad = dict(sd)
    bad[key] = sd[key][:, :16]
    save_file(bad, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*shape"):
        load_unet(d)
    bad = dict(sd)
    del bad[key]
    save_file(bad, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*to_k"):
        load_unet(d)


def test_commands_import_is_light():
    code = (
        "import sys, argparse, orthofuse_jax.cli.generate_commands as c;"
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers());"
        "a = p.parse_args(['generate', '--model', 'm', '--embeddings', 'e.npz', '-o', 'o.png']);"
        "assert a.steps == 50 and a.guidance == 5.0 and a.height == a.width == 1024 and a.dtype == 'fp32';"
        "assert a.func is c.run_generate;"
        "assert not {'jax', 'flax', 'diffusers'} & set(sys.modules), 'heavy import'"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


def test_generate_cli_missing_model_is_a_clear_error(tmp_path, capsys):
    from orthofuse_jax.cli import main

    emb = tmp_path / "emb.npz"
    np.savez(emb, prompt_embeds=np.zeros((77, 2048), np.float32), pooled=np.zeros(1280, np.float32))
    rc = main(
        [
            "generate",
            "--model",
            str(tmp_path / "sdxl"),
            "--embeddings",
            str(emb),
            "-o",
            str(tmp_path / "o.png"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "sdxl" in err and "does not exist" in err and "hub" in err
    assert not (tmp_path / "o.png").exists()


def test_generate_bf16_close_to_fp32(tiny_unet_dir):
    """bf16 UNet (adapter folded in float32, then cast): latents stay close to the fp32 run."""
    from orthofuse_jax.models import generate

    rng = np.random.default_rng(1)
    emb = dict(
        prompt_embeds=rng.standard_normal((5, 48)).astype(np.float32),
        pooled=rng.standard_normal(TEXT_EMBED_DIM).astype(np.float32),
    )
    adapter = random_adapter(attention_layers(TINY_UNET), seed=11)
    kw = dict(adapter=adapter, num_steps=2, height=64, width=64, progress=False)
    img32, lat32 = generate(tiny_unet_dir, emb, **kw)
    img16, lat16 = generate(tiny_unet_dir, emb, dtype="bf16", **kw)
    assert img32 is None and img16 is None  # a bare UNet folder: no vae/, latents only
    assert lat32.shape == (1, 4, 8, 8) and lat32.dtype == np.float32
    rel = np.linalg.norm(lat16 - lat32) / np.linalg.norm(lat32)
    assert 0 < rel < 5e-2
    with pytest.raises(ValueError, match="dtype"):
        generate(tiny_unet_dir, emb, dtype="fp16", **kw)
