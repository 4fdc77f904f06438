"""SDXL sampling with a (patched) Flax UNet: Euler, classifier-free guidance, VAE decode (docs/math.md §4).

The reference samples with diffusers' ``EulerDiscreteScheduler`` of SDXL base 1.0: scaled-linear
betas 0.00085 -> 0.012 over 1000 training steps, epsilon prediction, ``"leading"`` spacing with
``steps_offset=1`` (50 steps -> timesteps 981, 961, ..., 1), ``init_noise_sigma = sqrt(s_max^2+1)``,
and the deterministic update ``x <- x + (s_{i+1} - s_i) eps`` with the UNet fed ``x/sqrt(s_i^2+1)``;
guidance ``eps = eps_u + g (eps_c - eps_u)`` with zero negative embeddings
(``force_zeros_for_empty_prompt``), time ids ``(H, W, 0, 0, H, W)``.

Prompts are either text, encoded by the model folder's two CLIP text encoders
(:mod:`orthofuse_jax.models.text`), or precomputed embeddings (``prompt_embeds [77, 2048]``:
penultimate hidden states of both CLIP encoders concatenated; ``pooled [1280]``: text_encoder_2's
projected pooled output), e.g. written by ``orthofuse-jax encode-prompt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EulerSchedule",
    "alphas_cumprod",
    "check_embeddings",
    "decode",
    "denoise",
    "euler_schedule",
    "generate",
    "load_embeddings",
    "to_uint8",
]


@dataclass(frozen=True)
class EulerSchedule:
    """Timesteps ``[steps]``, sigmas ``[steps + 1]`` (last 0) and the initial noise scale."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float


def alphas_cumprod(
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    **_ignored,
) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` of diffusers' DDPM/Euler schedulers (float64, ``[T]``).

    ``scaled_linear``: ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` (SDXL);
    ``linear``: ``linspace(beta_start, beta_end, T)``. Extra scheduler-config keys are ignored.
    """
    if beta_schedule == "scaled_linear":
        betas = (
            np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        )
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(
            f"beta_schedule {beta_schedule!r} is not supported (scaled_linear, linear)"
        )
    return np.cumprod(1.0 - betas)


def euler_schedule(
    num_steps: int = 50,
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    **_ignored,
) -> EulerSchedule:
    """diffusers ``EulerDiscreteScheduler.set_timesteps`` (no Karras sigmas, linear interpolation).

    Extra keys of a ``scheduler_config.json`` are accepted and ignored.
    """
    ac = alphas_cumprod(
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        num_train_timesteps=num_train_timesteps,
    )
    all_sigmas = ((1 - ac) / ac) ** 0.5
    t: np.ndarray
    if timestep_spacing == "leading":
        step = num_train_timesteps // num_steps
        t = (np.arange(num_steps) * step).round()[::-1].astype(np.float64) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        t = (np.arange(num_train_timesteps, 0, -ratio)).round() - 1
    elif timestep_spacing == "linspace":
        t = np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    else:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} is not supported")
    sigmas = np.interp(t, np.arange(num_train_timesteps), all_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]])
    smax = float(sigmas.max())
    init = smax if timestep_spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
    return EulerSchedule(
        timesteps=t.astype(np.float32), sigmas=sigmas.astype(np.float32), init_noise_sigma=init
    )


def _make_step(unet, guidance_scale: float):
    cfg = guidance_scale > 1.0

    def step(params, x, t, sigma, sigma_next, ctx, text_embeds, time_ids):
        inp = x / jnp.sqrt(sigma**2 + 1)
        if cfg:
            inp = jnp.concatenate([inp, inp])
        tt = jnp.broadcast_to(t, (inp.shape[0],))
        eps = unet.apply(
            {"params": params},
            inp.astype(unet.dtype),
            tt,
            ctx,
            {"text_embeds": text_embeds, "time_ids": time_ids},
        ).sample.astype(jnp.float32)
        if cfg:
            eps_u, eps_c = jnp.split(eps, 2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        return x + (sigma_next - sigma) * eps

    return jax.jit(step)


def denoise(
    unet,
    params,
    prompt_embeds,
    pooled,
    *,
    height: int = 1024,
    width: int = 1024,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    negative_prompt_embeds=None,
    negative_pooled=None,
    schedule: EulerSchedule | None = None,
    vae_scale_factor: int = 8,
    progress: bool = True,
    latents=None,
):
    """Euler sampling loop over a jitted UNet step; returns latents ``[1, C, H/f, W/f]`` (float32).

    ``prompt_embeds`` ``[T, D]``, ``pooled`` ``[P]``; negatives default to zeros (docs/math.md §4).
    ``latents``: initial unit-variance noise (default ``normal(PRNGKey(seed))``); it is
    multiplied by ``init_noise_sigma`` here.
    """
    from tqdm.auto import tqdm

    sched = schedule or euler_schedule(num_steps)
    dt = unet.dtype
    pe = jnp.asarray(prompt_embeds, jnp.float32)[None]
    pp = jnp.asarray(pooled, jnp.float32)[None]
    ne = (
        jnp.zeros_like(pe)
        if negative_prompt_embeds is None
        else jnp.asarray(negative_prompt_embeds)[None]
    )
    npool = jnp.zeros_like(pp) if negative_pooled is None else jnp.asarray(negative_pooled)[None]
    time_ids = jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32)
    if guidance_scale > 1.0:
        ctx, text, tids = (
            jnp.concatenate([ne, pe]),
            jnp.concatenate([npool, pp]),
            jnp.concatenate([time_ids] * 2),
        )
    else:
        ctx, text, tids = pe, pp, time_ids
    ctx, text = ctx.astype(dt), text.astype(dt)
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(
            f"height/width must be multiples of {vae_scale_factor}, got {height}x{width}"
        )
    shape = (1, unet.in_channels, height // vae_scale_factor, width // vae_scale_factor)
    if latents is None:
        latents = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
    x = jnp.asarray(latents, jnp.float32) * sched.init_noise_sigma
    step = _make_step(unet, guidance_scale)
    steps = range(len(sched.timesteps))
    for i in tqdm(steps, desc="denoising", disable=not progress):
        x = step(
            params, x, sched.timesteps[i], sched.sigmas[i], sched.sigmas[i + 1], ctx, text, tids
        )
    return x


def decode(vae, vae_params, latents, *, scaling_factor: float | None = None):
    """VAE decode ``latents / scaling_factor`` -> images ``[B, H, W, 3]`` in [0, 1]."""
    sf = scaling_factor if scaling_factor is not None else vae.config.scaling_factor
    img = jax.jit(lambda p, z: vae.apply({"params": p}, z / sf, method=vae.decode).sample)(
        vae_params, latents.astype(vae.dtype)
    )
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def to_uint8(images) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.uint8)


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read prompt embeddings from an ``.npz``.

    Required keys: ``prompt_embeds`` ``[T, D]`` (SDXL: ``[77, 2048]``) and ``pooled`` ``[P]``
    (``[1280]``); optional ``negative_prompt_embeds`` and ``negative_pooled`` (zeros otherwise).
    A leading batch axis of 1 is dropped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file {path!r} does not exist")
    with np.load(path) as f:
        data = {k: np.asarray(f[k]) for k in f.files}
    for k in ("prompt_embeds", "pooled"):
        if k not in data:
            raise ValueError(f"{path}: missing array {k!r} (found {sorted(data)})")
    out = {}
    for k, v in data.items():
        if k in ("prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled"):
            want = 2 if "embeds" in k else 1
            if v.ndim == want + 1 and v.shape[0] == 1:
                v = v[0]
            if v.ndim != want:
                raise ValueError(f"{path}: {k!r} has shape {v.shape}, expected {want} axes")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{path}: {k!r} has non-finite values")
            out[k] = v.astype(np.float32)
    return out


def check_embeddings(
    embeddings: Mapping[str, np.ndarray], config: Mapping, *, source: str = "embeddings"
) -> None:
    """Raise ``ValueError`` naming the array when the embeddings do not fit the UNet ``config``.

    ``prompt_embeds`` must have ``cross_attention_dim`` features (SDXL: 2048) and ``pooled`` the
    text part of the added embedding (``projection_class_embeddings_input_dim - 6 *
    addition_time_embed_dim``; SDXL: 1280).
    """
    want = {"prompt_embeds": config.get("cross_attention_dim")}
    if config.get("addition_embed_type") == "text_time":
        want["pooled"] = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
    for key, dim in want.items():
        for k in (key, "negative_" + key if key == "prompt_embeds" else "negative_pooled"):
            if k in embeddings and dim is not None and np.shape(embeddings[k])[-1] != dim:
                raise ValueError(
                    f"{source}: {k!r} has shape {tuple(np.shape(embeddings[k]))}, the UNet expects {dim} "
                    "features on the last axis (embeddings of another model?)"
                )


def _scheduler_config(model: str) -> dict:
    path = os.path.join(model, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    # Whatever the folder's scheduler class, the reference samples with Euler (docs/math.md §4); only its
    # beta/timestep settings are taken from the file.
    if cfg.get("prediction_type", "epsilon") != "epsilon" or cfg.get("use_karras_sigmas", False):
        raise ValueError(f"{path}: only epsilon prediction without Karras sigmas is supported")
    return cfg


def generate(
    model: str | os.PathLike,
    embeddings: Mapping[str, np.ndarray] | str,
    *,
    negative_prompt: str | None = None,
    adapter=None,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    height: int = 1024,
    width: int = 1024,
    seed: int = 0,
    dtype: str = "fp32",
    progress: bool = True,
    allow_download: bool = False,
    latents=None,
):
    """Sample one image with the SDXL UNet in ``model`` and ``adapter`` folded in (docs/math.md §4 defaults).

    ``embeddings``: a prompt string (encoded with ``model``'s text encoders, ``negative_prompt``
    as the SDXL pipeline treats it: see :func:`~orthofuse_jax.models.text.prompt_embeddings`) or
    the mapping :func:`load_embeddings` returns.

    Returns ``(image uint8 [H, W, 3] or None, latents [1, 4, H/8, W/8])``; the image is ``None``
    when ``model`` has no ``vae/`` folder. ``dtype`` "bf16" runs the UNet in bfloat16 (params cast
    after folding, which happens in float32); the scheduler and the VAE stay float32.
    ``latents``: initial unit-variance noise ``[1, 4, H/8, W/8]`` (default: drawn from ``seed``).
    """
    from .patch import patch_unet_params
    from .weights import load_unet, load_vae

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    model = os.fspath(model)
    if not os.path.exists(model) and allow_download:
        from . import _backbone

        model = _backbone.download(model)
    if isinstance(embeddings, str):
        from .text import prompt_embeddings

        # Encoded before the UNet is loaded, so the text encoders are freed first.
        embeddings = prompt_embeddings(model, embeddings, negative_prompt)
    elif negative_prompt is not None:
        raise ValueError(
            "negative_prompt needs a prompt string; put negative_prompt_embeds in the embeddings"
        )
    unet, params, config = load_unet(model, dtype=jdt)
    check_embeddings(embeddings, config)
    if adapter is not None:
        params = patch_unet_params(params, adapter, config=config)
    if dtype == "bf16":
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    root = model
    has_vae = os.path.isfile(os.path.join(root, "vae", "config.json"))
    vae_factor = 8
    if has_vae:
        vae, vae_params, vae_cfg = load_vae(root)
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    sched_cfg = _scheduler_config(root)
    sched = euler_schedule(num_steps, **sched_cfg)
    latents = denoise(
        unet,
        params,
        embeddings["prompt_embeds"],
        embeddings["pooled"],
        height=height,
        width=width,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        negative_prompt_embeds=embeddings.get("negative_prompt_embeds"),
        negative_pooled=embeddings.get("negative_pooled"),
        schedule=sched,
        vae_scale_factor=vae_factor,
        progress=progress,
        latents=latents,
    )
    if not has_vae:
        return None, np.asarray(latents)
    image = to_uint8(decode(vae, vae_params, latents))[0]
    return image, np.asarray(latents)
