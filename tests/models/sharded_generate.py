"""Data-parallel generation on four forced CPU devices, against one image per call on one device.

Run as a script by ``test_generate_sharded.py`` with the tiny model folder (unet/, vae/) and a
folder for ``reference.npz`` (the embeddings and the reference uint8 images, for the CLI test) as
its arguments (the device count is fixed when JAX starts, so it needs a process of its own);
prints one JSON object of findings.
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from orthofuse_jax.models import data_mesh, euler_schedule, generate, load_unet, load_vae  # noqa: E402
from orthofuse_jax.models.generate import make_step  # noqa: E402

SEED = 3
STEPS = 2
SIZE = 64
GUIDANCE = 5.0
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def embeddings(unet_config: dict) -> dict:
    rng = np.random.default_rng(0)
    pooled = (
        unet_config["projection_class_embeddings_input_dim"]
        - 6 * unet_config["addition_time_embed_dim"]
    )
    return dict(
        prompt_embeds=rng.standard_normal((5, unet_config["cross_attention_dim"])).astype(
            np.float32
        ),
        pooled=rng.standard_normal(pooled).astype(np.float32),
    )


def one_by_one(model: str, unet, params, emb: dict, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i alone on the default device from ``normal(PRNGKey(SEED + i))``: a plain Euler loop.

    The UNet sees ``[uncond, cond]`` as one batch of two (diffusers' pipeline layout), the update
    is ``x + (sigma' - sigma) eps`` (docs/math.md §4), the VAE decodes one latent at a time.
    """
    vae, vae_params, _ = load_vae(model)
    sched = euler_schedule(STEPS)
    ctx = np.stack([np.zeros_like(emb["prompt_embeds"]), emb["prompt_embeds"]])
    text = np.stack([np.zeros_like(emb["pooled"]), emb["pooled"]])
    tids = np.asarray([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, np.float32)
    cond = {"text_embeds": text, "time_ids": tids}

    @jax.jit
    def eps(x, t, sigma):
        inp = jnp.concatenate([x, x]) / jnp.sqrt(sigma**2 + 1)
        out = unet.apply({"params": params}, inp, jnp.full((2,), t), ctx, cond).sample
        return out[0:1] + GUIDANCE * (out[1:2] - out[0:1])

    @jax.jit
    def pixels(z):
        img = vae.apply({"params": vae_params}, z / vae.config.scaling_factor, method=vae.decode)
        return jnp.clip(img.sample / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    lats, imgs = [], []
    for i in range(count):
        x = jax.random.normal(
            jax.random.PRNGKey(SEED + i), (1, 4, SIZE // 8, SIZE // 8), jnp.float32
        )
        x = x * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            x = x + (sched.sigmas[k + 1] - sched.sigmas[k]) * eps(x, t, sched.sigmas[k])
        lats.append(np.asarray(x))
        imgs.append(np.asarray(pixels(x)))
    return np.concatenate(lats), np.concatenate(imgs)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def step_program(unet, params, emb: dict, mesh) -> dict:
    """The compiled sharded step: its collectives, partitions, programs after 3 calls, out layout."""
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    b = 2 * mesh.size  # two images per device
    ctx = np.tile(emb["prompt_embeds"][None], (2 * b, 1, 1))
    text = np.tile(emb["pooled"][None], (2 * b, 1))
    tids = np.tile(np.asarray([[SIZE, SIZE, 0, 0, SIZE, SIZE]], np.float32), (2 * b, 1))
    args = [jax.device_put(a, batch) for a in (ctx, text, tids)]
    params = jax.device_put(params, rep)
    x = jax.device_put(jnp.zeros((b, 4, SIZE // 8, SIZE // 8)), batch)
    step = make_step(unet, GUIDANCE, mesh)
    for t in (981.0, 481.0, 1.0):
        x = step(params, x, np.float32(t), np.float32(2.0), np.float32(1.0), *args)
    hlo = step.lower(params, x, *np.float32([1.0, 2.0, 1.0]), *args).compile().as_text()
    return {
        "collectives": [c for c in COLLECTIVES if c in hlo],
        "partitions": "num_partitions=4" in hlo,
        "programs": step._cache_size(),
        "out_spec": list(x.sharding.spec),
    }


def main(model: str, out: str) -> None:
    found: dict = {"devices": jax.device_count()}
    unet, params, config = load_unet(model)
    emb = embeddings(config)
    ref_lat, ref_img = one_by_one(model, unet, params, emb, 6)
    images = np.round(ref_img * 255).astype(np.uint8)
    np.savez(os.path.join(out, "reference.npz"), images=images, **emb)
    kw = dict(num_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, seed=SEED)
    kw.update(progress=False)
    for d, n in ((4, 4), (4, 6)):
        imgs, lats = generate(model, emb, num_images=n, mesh=data_mesh(f"data={d}"), **kw)
        found[f"d{d}-n{n}"] = {
            "shape": list(imgs.shape),
            "latents": rel(lats, ref_lat[:n]),
            "per_image": max(rel(lats[i], ref_lat[i]) for i in range(n)),
            "uint8": int(np.abs(imgs.astype(int) - np.round(ref_img[:n] * 255)).max()),
        }
    found["step"] = step_program(unet, params, emb, data_mesh(4))
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
