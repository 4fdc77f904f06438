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
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import DATA_AXIS

__all__ = [
    "EulerSchedule",
    "alphas_cumprod",
    "check_embeddings",
    "decode",
    "denoise",
    "euler_schedule",
    "generate",
    "initial_noise",
    "load_embeddings",
    "make_step",
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


def make_step(unet, guidance_scale: float, mesh: Mesh | None = None):
    """The jitted Euler step ``(params, x, t, sigma, sigma_next, ctx, text_embeds, time_ids) -> x'``.

    ``x`` ``[B, C, h, w]``; with guidance (``guidance_scale > 1``) the conditioning has ``2B`` rows,
    each image's unconditional row followed by its conditional one (``u0, c0, u1, c1, ...``), so
    a device holding image ``i`` holds both of its UNet rows. ``mesh``: params and scalars
    replicated, ``x`` and the conditioning split on their batch axis over ``data``: one program
    for the whole mesh, with no communication between devices.
    """
    cfg = guidance_scale > 1.0

    def step(params, x, t, sigma, sigma_next, ctx, text_embeds, time_ids):
        inp = x / jnp.sqrt(sigma**2 + 1)
        if cfg:
            inp = jnp.repeat(inp, 2, axis=0)
        tt = jnp.broadcast_to(t, (inp.shape[0],))
        eps = unet.apply(
            {"params": params},
            inp.astype(unet.dtype),
            tt,
            ctx,
            {"text_embeds": text_embeds, "time_ids": time_ids},
        ).sample.astype(jnp.float32)
        if cfg:
            pair = eps.reshape(x.shape[0], 2, *x.shape[1:])
            eps = pair[:, 0] + guidance_scale * (pair[:, 1] - pair[:, 0])
        return x + (sigma_next - sigma) * eps

    if mesh is None:
        return jax.jit(step)
    rep, batch = _shardings(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, batch, rep, rep, rep, batch, batch, batch),
        out_shardings=batch,
    )


def _shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """Replicated, and split over ``data`` on the leading axis."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
    """``a`` with zero rows appended up to a multiple of ``multiple`` rows."""
    extra = -a.shape[0] % multiple
    return np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)]) if extra else a


def initial_noise(seed: int, num_images: int, shape) -> np.ndarray:
    """Unit-variance noise ``[N, *shape[1:]]``: image ``i`` is ``normal(PRNGKey(seed + i))`` (float32).

    Image ``i`` depends on neither ``N`` nor the device count, and image 0 is the noise of a
    one-image run with the same ``seed``.
    """
    one = (1, *tuple(shape)[1:])
    return np.concatenate(
        [
            np.asarray(jax.random.normal(jax.random.PRNGKey(seed + i), one, jnp.float32))
            for i in range(num_images)
        ]
    )


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
    num_images: int | None = None,
    mesh: Mesh | None = None,
):
    """Euler sampling loop over a jitted UNet step; returns latents ``[N, C, H/f, W/f]`` (float32).

    ``prompt_embeds`` ``[T, D]``, ``pooled`` ``[P]``, one prompt for all ``N`` images; negatives
    default to zeros (docs/math.md §4). ``latents``: initial unit-variance noise ``[N, C, H/f,
    W/f]`` (default :func:`initial_noise`: image ``i`` from ``seed + i``); it is multiplied by
    ``init_noise_sigma`` here. ``num_images`` defaults to ``latents``' rows, else 1.

    ``mesh`` (:func:`~orthofuse_jax.models.mesh.data_mesh`): ``params`` replicated, the images
    split over ``data``; the batch is padded with zero latents to a multiple of the device count
    and the padding dropped. ``None``: the default device, no padding.
    """
    from tqdm.auto import tqdm

    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(
            f"height/width must be multiples of {vae_scale_factor}, got {height}x{width}"
        )
    n = _num_images(num_images, latents)
    shape = (n, unet.in_channels, height // vae_scale_factor, width // vae_scale_factor)
    if latents is None:
        latents = initial_noise(seed, n, shape)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
    sched = schedule or euler_schedule(num_steps)
    x = _pad_rows(np.asarray(latents, np.float32) * sched.init_noise_sigma, _size(mesh))
    cond = _conditioning(
        prompt_embeds,
        pooled,
        negative_prompt_embeds,
        negative_pooled,
        rows=x.shape[0],
        cfg=guidance_scale > 1.0,
        height=height,
        width=width,
        dtype=unet.dtype,
    )
    if mesh is not None:
        rep, batch = _shardings(mesh)
        params = jax.device_put(params, rep)
        x, cond = jax.device_put(x, batch), jax.device_put(cond, batch)
    step = make_step(unet, guidance_scale, mesh)
    for i in tqdm(range(len(sched.timesteps)), desc="denoising", disable=not progress):
        x = step(params, x, sched.timesteps[i], sched.sigmas[i], sched.sigmas[i + 1], *cond)
    return x[:n] if x.shape[0] != n else x


def _num_images(num_images: int | None, latents) -> int:
    """``num_images``, else the rows of ``latents``, else 1; at least 1."""
    n = num_images if num_images is not None else (1 if latents is None else len(latents))
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_images must be a whole number >= 1, got {n!r}")
    return int(n)


def _size(mesh: Mesh | None) -> int:
    """Devices on the ``data`` axis (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def _conditioning(pe, pp, ne, npool, *, rows: int, cfg: bool, height: int, width: int, dtype):
    """Context ``[R, T, D]``, pooled ``[R, P]`` and time ids ``[R, 6]`` for ``rows`` images.

    ``R = 2 rows`` with guidance: (negative, positive) per image, in :func:`make_step`'s order.
    """
    pe = np.asarray(pe, np.float32)[None]
    pp = np.asarray(pp, np.float32)[None]
    time_ids = np.asarray([[height, width, 0, 0, height, width]], np.float32)
    if cfg:
        ne = np.zeros_like(pe) if ne is None else np.asarray(ne, np.float32)[None]
        npool = np.zeros_like(pp) if npool is None else np.asarray(npool, np.float32)[None]
        pe, pp = np.concatenate([ne, pe]), np.concatenate([npool, pp])
        time_ids = np.concatenate([time_ids] * 2)
    ctx, text, tids = (np.tile(a, (rows,) + (1,) * (a.ndim - 1)) for a in (pe, pp, time_ids))
    return jnp.asarray(ctx, dtype), jnp.asarray(text, dtype), jnp.asarray(tids)


def decode(
    vae, vae_params, latents, *, scaling_factor: float | None = None, mesh: Mesh | None = None
):
    """VAE decode ``latents / scaling_factor`` -> images ``[B, H, W, 3]`` in [0, 1].

    ``mesh``: ``vae_params`` replicated, one image per device per call (the decoder's activations
    at full resolution are the largest of the pipeline), padding dropped.
    """
    sf = scaling_factor if scaling_factor is not None else vae.config.scaling_factor

    def run(p, z):
        img = vae.apply({"params": p}, z.astype(vae.dtype) / sf, method=vae.decode).sample
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    if mesh is None:
        return jax.jit(run)(vae_params, latents)
    rep, batch = _shardings(mesh)
    fn = jax.jit(run, in_shardings=(rep, batch), out_shardings=batch)
    params, d = jax.device_put(vae_params, rep), _size(mesh)
    z = _pad_rows(np.asarray(latents, np.float32), d)
    parts = [np.asarray(fn(params, z[i : i + d])) for i in range(0, len(z), d)]
    return jnp.asarray(np.concatenate(parts)[: len(latents)])


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
    num_images: int | None = None,
    mesh: Mesh | None = None,
):
    """Sample images with the SDXL UNet in ``model`` and ``adapter`` folded in (docs/math.md §4 defaults).

    ``embeddings``: a prompt string (encoded with ``model``'s text encoders, ``negative_prompt``
    as the SDXL pipeline treats it: see :func:`~orthofuse_jax.models.text.prompt_embeddings`) or
    the mapping :func:`load_embeddings` returns.

    Returns ``(images uint8 [N, H, W, 3] or None, latents [N, 4, H/8, W/8])``; the images are
    ``None`` when ``model`` has no ``vae/`` folder. ``dtype`` "bf16" runs the UNet in bfloat16
    (params cast after folding, which happens in float32); the scheduler and the VAE stay float32.
    ``latents``: initial unit-variance noise ``[N, 4, H/8, W/8]`` (default: image ``i`` drawn
    from ``seed + i``, :func:`initial_noise`). ``num_images`` ``N`` defaults to ``latents``' rows,
    else 1.

    ``mesh`` (:func:`~orthofuse_jax.models.mesh.data_mesh`): the images are split over its
    ``data`` devices, the UNet and VAE params replicated; any ``N`` works (the batch is padded to
    a multiple of the device count). Image ``i`` is the same whatever ``N`` and the device count.
    ``None``: the default device.
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
        num_images=num_images,
        mesh=mesh,
    )
    if not has_vae:
        return None, np.asarray(latents)
    images = to_uint8(decode(vae, vae_params, latents, mesh=mesh))
    return images, np.asarray(latents)
