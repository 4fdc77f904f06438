"""Train GS orthogonal adapters on a frozen Flax SDXL UNet with optax (SPEC 6).

The trainable state is a :class:`~orthofuse_jax.fusion.adapter.GSAdapter` of raw Cayley
parameters (``L = R = 0``, so every block is ``Cay(0) = I``) and per-channel scales (ones) for
every ``to_q/to_k/to_v/to_out`` projection of every ``attn1``/``attn2`` (SPEC 2); at step 0 the
model is exactly the base model. The loss is the epsilon-prediction MSE (SPEC 6)

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0..T-1},   eps ~ N(0, I)
    loss = mean( (eps_theta(x_t, t, c) - eps)^2 )

with the adapter applied to the attention projections. The reference rotates the projection
input at every call, ``s * (W (Q x))``; here the adapter is folded into the kernels inside the
loss, ``K_eff = (Q^T K) * s`` (the same product reassociated, :mod:`.patch`), so gradients reach
``L, R`` through ``Q = P^T BD(Cay(L)) P BD(Cay(R))`` and the scales through ``K_eff``; the base
parameters are arguments that are never differentiated.

Skewness is kept exactly, as in the reference (SPEC 1.2): the loss sees ``L`` only through
``skew(L) = (L - L^T)/2``, whose VJP ``(G - G^T)/2`` is exactly antisymmetric in floating point
(halving is exact), and AdamW (moments, bias correction, decoupled weight decay, global-norm
clipping) acts elementwise or by a common factor, so zero-initialised parameters stay exactly
skew with a zero diagonal and checkpoints hold ``A = S``.

Optimiser: ``optax.adamw`` with the reference's ``torch.optim.AdamW`` defaults (lr 1e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 1e-4 on every adapter parameter, scales included); the
reference parses ``max_grad_norm`` but never applies it (SPEC 9.13) -- here it is applied when
given. Optional bfloat16 compute: the UNet runs in bf16, the adapter, the fold and the loss stay
float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..fusion.adapter import GSAdapter, from_layers
from ..geometry import cayley, gs_apply_transpose
from .layers import AttentionLayer, attention_layers
from .patch import fold_plan

__all__ = [
    "DDPM_SDXL",
    "TrainConfig",
    "alphas_cumprod",
    "init_adapter",
    "fold_adapter",
    "add_noise",
    "diffusion_loss",
    "make_loss",
    "make_optimizer",
    "make_train_step",
    "train",
    "scheduler_config",
]

# SDXL base 1.0 scheduler settings used by the reference's DDPMScheduler (SPEC 4, 6).
DDPM_SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def alphas_cumprod(
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    **_ignored,
) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` of diffusers' ``DDPMScheduler`` (float64, ``[T]``).

    ``scaled_linear``: ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` (SDXL);
    ``linear``: ``linspace(beta_start, beta_end, T)``. Extra scheduler-config keys are ignored.
    """
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (scaled_linear, linear)")
    return np.cumprod(1.0 - betas)


def scheduler_config(model: str | os.PathLike) -> dict:
    """``model/scheduler/scheduler_config.json`` restricted to the DDPM keys (SDXL defaults if absent).

    Raises ``ValueError`` for a non-epsilon ``prediction_type`` (the loss is epsilon-prediction).
    """
    path = os.path.join(os.fspath(model), "scheduler", "scheduler_config.json")
    cfg = dict(DDPM_SDXL)
    if os.path.isfile(path):
        with open(path) as f:
            raw = json.load(f)
        if raw.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"{path}: prediction_type {raw['prediction_type']!r}; only 'epsilon' is supported")
        cfg.update({k: raw[k] for k in DDPM_SDXL if k in raw})
    return cfg


def init_adapter(
    config_or_table: Mapping,
    nblocks: int = 32,
    *,
    dtype=jnp.float32,
    scales: bool = True,
) -> GSAdapter:
    """Zero-initialised trainable adapter for every attention projection of a UNet (SPEC 1.1, 2).

    ``L = R = 0`` ``[nb, n/nb, n/nb]`` (``n`` = the projection's input width) and unit scales of the
    output width, named as in the reference checkpoint (SPEC 5).

    Args:
      config_or_table: a diffusers UNet config, or a ``{name: AttentionLayer}`` table.
      nblocks: blocks per GS matrix (reference: 32).
      dtype: parameter dtype (float32; float64 for gradient checks).
      scales: also train per-channel scales (reference ``moft_scale=True``).
    Raises:
      ValueError: naming the first layer whose width ``n`` is not divisible by ``nblocks``.
    """
    table = _table(config_or_table)
    if nblocks < 1:
        raise ValueError(f"nblocks must be >= 1, got {nblocks}")
    layers, sc = {}, {}
    for name, spec in table.items():
        if spec.n_in % nblocks:
            raise ValueError(
                f"nblocks={nblocks} does not divide the width n={spec.n_in} of layer {name!r}"
            )
        b = spec.n_in // nblocks
        zero = np.zeros((nblocks, b, b), np.float64)
        layers[name] = (zero, zero)
        if scales:
            sc[name] = np.ones((spec.n_out,), np.float64)
    return from_layers(layers, sc, orthogonal=False, dtype=dtype)


def _table(config_or_table: Mapping) -> dict[str, AttentionLayer]:
    if config_or_table and all(isinstance(v, AttentionLayer) for v in config_or_table.values()):
        return dict(config_or_table)
    return attention_layers(config_or_table)


def _copy_containers(tree):
    if isinstance(tree, Mapping):
        return {k: _copy_containers(v) for k, v in tree.items()}
    return tree


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


@dataclass(frozen=True)
class FoldPlan:
    """Static grouping of adapter layers by ``(stack key, output width)`` (see :func:`.patch.fold_plan`)."""

    groups: tuple[tuple[str, tuple[int, ...], tuple[AttentionLayer, ...]], ...]

    @classmethod
    def build(cls, params, adapter: GSAdapter, config=None) -> FoldPlan:
        raw = fold_plan(params, adapter, config=config)
        groups = []
        for (key, _n_out), members in sorted(raw.items()):
            groups.append((key, tuple(i for i, _ in members), tuple(spec for _, spec in members)))
        return cls(tuple(groups))


def fold_adapter(params, adapter: GSAdapter, plan: FoldPlan, *, compute_dtype=None):
    """Traceable ``K_eff = (Q^T K) * s`` for every adapted kernel; differentiable in ``adapter``.

    Unlike :func:`~orthofuse_jax.models.patch_unet_params` this does no value checks, so it runs
    under ``jax.grad``/``jax.jit``. The product is computed in the promoted dtype of the adapter
    and float32 (never lower), then cast to ``compute_dtype`` (default: the kernel's dtype).
    """
    orth = adapter if adapter.orthogonal else adapter.map_stacks(cayley, orthogonal=True)
    new = _copy_containers(params)

    def one(K, L, R, s):
        return gs_apply_transpose(K.T, L, R).T * s[None, :]

    fold = jax.vmap(one)
    for key, idx, specs in plan.groups:
        stack = orth.stacks[key]
        dt = jnp.promote_types(stack.L.dtype, jnp.float32)
        K = jnp.stack([_get(params, spec.path).astype(dt) for spec in specs])
        ones = jnp.ones((specs[0].n_out,), dt)
        s = jnp.stack([adapter.scales[spec.name].astype(dt) if spec.name in adapter.scales else ones for spec in specs])
        ii = np.asarray(idx)
        res = fold(K, stack.L[ii].astype(dt), stack.R[ii].astype(dt), s)
        for j, spec in enumerate(specs):
            out_dt = compute_dtype or _get(params, spec.path).dtype
            _set(new, spec.path, res[j].astype(out_dt))
    return new


def add_noise(x0, noise, t, abar):
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (DDPM forward process, per batch item)."""
    a = abar[t].astype(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def diffusion_loss(
    adapter: GSAdapter, params, batch: Mapping, key, *, unet, plan: FoldPlan, abar, compute_dtype=None, apply: str = "fold"
):
    """Epsilon-prediction MSE of the UNet with ``adapter`` folded in (SPEC 6); returns a scalar.

    Args:
      adapter: raw-parameter :class:`GSAdapter` (the differentiated argument).
      params: frozen Flax UNet parameters.
      batch: ``latents`` ``[B, C, h, w]`` (``x_0``, already multiplied by the VAE scaling factor),
        ``prompt_embeds`` ``[B, T, D]``, ``text_embeds`` ``[B, P]`` (pooled), ``time_ids`` ``[B, 6]``.
      key: PRNG key for ``t ~ U{0..len(abar)-1}`` and ``eps ~ N(0, I)``.
      unet: the ``FlaxUNet2DConditionModel`` (its ``dtype`` is the compute dtype).
      plan: :class:`FoldPlan` of ``adapter`` against ``params``.
      abar: ``alphas_cumprod`` ``[T]`` (float32 or float64 array).
      apply: ``"fold"`` (``K_eff = (Q^T K) * s`` once per step) or ``"onthefly"`` (the reference's
        ``s * W (Q x)`` at every projection call, :func:`~orthofuse_jax.models.apply_onthefly`);
        the same function of the adapter, with different costs: folding costs ``O(n b out)`` per
        layer, the on-the-fly rotation ``O(tokens n b)`` (cheaper for few tokens, e.g. attn2 k/v).
    """
    x0 = jnp.asarray(batch["latents"])
    loss_dt = jnp.promote_types(x0.dtype, jnp.float32)
    x0 = x0.astype(loss_dt)
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, abar.shape[0])
    noise = jax.random.normal(kn, x0.shape, loss_dt)
    xt = add_noise(x0, noise, t, jnp.asarray(abar, loss_dt))
    cdt = compute_dtype or unet.dtype
    args = (
        xt.astype(cdt),
        t,
        jnp.asarray(batch["prompt_embeds"]).astype(cdt),
        {"text_embeds": jnp.asarray(batch["text_embeds"]).astype(cdt), "time_ids": jnp.asarray(batch["time_ids"]).astype(cdt)},
    )
    if apply == "fold":
        eff = fold_adapter(params, adapter, plan, compute_dtype=compute_dtype)
        pred = unet.apply({"params": eff}, *args).sample
    elif apply == "onthefly":
        import flax.linen as nn

        from .onthefly import onthefly_interceptor

        orth = adapter.map_stacks(cayley, orthogonal=True)
        table = {spec.name: spec for _, _, specs in plan.groups for spec in specs}
        with nn.intercept_methods(onthefly_interceptor(orth, table)):
            pred = unet.apply({"params": params}, *args).sample
    else:
        raise ValueError(f"apply must be 'fold' or 'onthefly', got {apply!r}")
    return jnp.mean(jnp.square(pred.astype(loss_dt) - noise))


def make_loss(
    unet, params, adapter: GSAdapter, *, config=None, noise_schedule: Mapping | None = None, compute_dtype=None,
    apply: str = "fold",
):
    """``loss(adapter, params, batch, key)`` bound to ``unet``, its fold plan and the DDPM schedule
    (``apply``: see :func:`diffusion_loss`)."""
    if apply not in ("fold", "onthefly"):
        raise ValueError(f"apply must be 'fold' or 'onthefly', got {apply!r}")
    plan = FoldPlan.build(params, adapter, config=config)
    abar = alphas_cumprod(**dict(noise_schedule or DDPM_SDXL))
    abar = jnp.asarray(abar, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)

    def loss(adapter, params, batch, key):
        return diffusion_loss(
            adapter, params, batch, key, unet=unet, plan=plan, abar=abar, compute_dtype=compute_dtype, apply=apply
        )

    return loss


def make_optimizer(
    learning_rate: float = 1e-4,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    max_grad_norm: float | None = None,
):
    """``optax.adamw`` with the reference defaults (SPEC 6), after optional global-norm clipping.

    ``max_grad_norm`` = None (the reference's behaviour: parsed, never applied) or a positive
    bound on ``||g||_2`` over all adapter parameters (``optax.clip_by_global_norm``).
    """
    import optax

    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adam
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)


def make_train_step(loss_fn: Callable, optimizer, *, donate: bool = True):
    """Jitted ``(adapter, opt_state, params, batch, key) -> (adapter, opt_state, loss)``.

    Only ``adapter`` is differentiated; ``params`` is a plain (frozen) argument. With ``donate``
    the old adapter and optimiser state buffers are reused for the new ones.
    """
    import optax

    def step(adapter, opt_state, params, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@dataclass
class TrainConfig:
    """Options of :func:`train` (defaults = the reference recipe, SPEC 6, except ``steps``)."""

    steps: int = 1000
    nblocks: int = 32
    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float | None = None
    batch_size: int = 1
    seed: int = 8
    train_scales: bool = True
    bf16: bool = False
    checkpoint_every: int = 0
    apply: str = "fold"
    progress: bool = True
    noise_schedule: dict = field(default_factory=lambda: dict(DDPM_SDXL))


def train(
    unet,
    params,
    unet_config: Mapping,
    datasets: Sequence,
    cfg: TrainConfig,
    *,
    mix: Sequence[float] | None = None,
    adapter: GSAdapter | None = None,
    on_checkpoint: Callable[[int, GSAdapter], None] | None = None,
):
    """Train one adapter on ``datasets`` (one: concept or style; two: the joint baseline).

    Each step draws a batch from one dataset; with several, step ``i`` uses dataset ``k`` in the
    deterministic interleave of :func:`~.train_data.schedule_datasets` (exact proportions
    ``mix``, default equal: concept, style, concept, ... for two).

    Args:
      unet, params, unet_config: the frozen Flax UNet (``unet.dtype`` bf16 for bf16 compute).
      datasets: objects with ``sample(rng, batch_size) -> batch dict`` (:class:`~.train_data.LatentData`).
      cfg: :class:`TrainConfig`.
      mix: per-dataset proportions (sum 1).
      adapter: initial adapter (default: :func:`init_adapter`).
      on_checkpoint: called as ``on_checkpoint(step, adapter)`` after every ``cfg.checkpoint_every``
        steps (``step`` = updates done) -- not after the last step; the caller saves the result.
    Returns:
      ``(adapter, losses)``: the trained float32 raw-parameter adapter and the per-step losses.
    """
    from tqdm.auto import tqdm

    from .train_data import schedule_datasets

    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if adapter is None:
        adapter = init_adapter(unet_config, cfg.nblocks, scales=cfg.train_scales)
    adapter = adapter.astype(jnp.float32)
    compute = jnp.bfloat16 if cfg.bf16 else None
    if cfg.bf16:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    loss_fn = make_loss(unet, params, adapter, config=unet_config, noise_schedule=cfg.noise_schedule, compute_dtype=compute,
                        apply=cfg.apply)
    opt = make_optimizer(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm
    )
    opt_state = opt.init(adapter)
    step_fn = make_train_step(loss_fn, opt)
    order = schedule_datasets(len(datasets), cfg.steps, mix)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    losses = []
    ema = None
    bar = tqdm(range(cfg.steps), desc="training", disable=not cfg.progress)
    for i in bar:
        batch = datasets[order[i]].sample(rng, cfg.batch_size)
        key, sub = jax.random.split(key)
        adapter, opt_state, loss = step_fn(adapter, opt_state, params, batch, sub)
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {i + 1}; lower the learning rate or set max_grad_norm")
        losses.append(loss)
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{ema:.4f}")
        done = i + 1
        if on_checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            on_checkpoint(done, adapter)
    return adapter, np.asarray(losses)
