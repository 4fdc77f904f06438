"""Train GS orthogonal adapters on a frozen Flax SDXL UNet with optax (docs/math.md §6).

The trainable state is a :class:`~orthofuse_jax.fusion.adapter.GSAdapter` of raw Cayley
parameters (``L = R = 0``, so every block is ``Cay(0) = I``) and per-channel scales (ones) for
every ``to_q/to_k/to_v/to_out`` projection of every ``attn1``/``attn2`` (docs/math.md §2); at step 0 the
model is exactly the base model. The loss is the epsilon-prediction MSE (docs/math.md §6)

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0..T-1},   eps ~ N(0, I)
    loss = mean( (eps_theta(x_t, t, c) - eps)^2 )

with the adapter applied to the attention projections. The reference rotates the projection
input at every call, ``s * (W (Q x))``; here the adapter is folded into the kernels inside the
loss, ``K_eff = (Q^T K) * s`` (the same product reassociated, :mod:`.patch`), so gradients reach
``L, R`` through ``Q = P^T BD(Cay(L)) P BD(Cay(R))`` and the scales through ``K_eff``; the base
parameters are arguments that are never differentiated.

Skewness is kept exactly, as in the reference (docs/math.md §1.2): the loss sees ``L`` only through
``skew(L) = (L - L^T)/2``, whose VJP ``(G - G^T)/2`` is exactly antisymmetric in floating point
(halving is exact), and AdamW (moments, bias correction, decoupled weight decay, global-norm
clipping) acts elementwise or by a common factor, so zero-initialised parameters stay exactly
skew with a zero diagonal and checkpoints hold ``A = S``.

Optimiser: ``optax.adamw`` with the reference's ``torch.optim.AdamW`` defaults (lr 1e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 1e-4 on every adapter parameter, scales included); the
reference parses ``max_grad_norm`` but never applies it (docs/math.md §8) -- here it is applied when
given. Optional bfloat16 compute: the UNet runs in bf16, the adapter, the fold and the loss stay
float32.

Resuming: the loop is a function of a :class:`TrainState` (step, adapter, optax state, PRNG key,
numpy data-RNG state, losses). :func:`save_checkpoint` writes the adapter in the reference format
(docs/math.md §5, unchanged) and the rest to ``ADAPTER.opt.npz`` beside it; :func:`load_checkpoint` checks
it against the model and the run's :func:`train_fingerprint`; :func:`run_training` continues it. A
run stopped at step ``m`` and resumed to ``n`` is the uninterrupted ``n``-step computation (bit for
bit on CPU in float32, tested). The state file holds AdamW's ``mu, nu``: about twice the adapter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..fusion.adapter import GSAdapter, from_layers, to_layers
from ..geometry import cayley, gs_apply_transpose
from .generate import alphas_cumprod
from .layers import AttentionLayer, attention_layers
from .patch import fold_plan

__all__ = [
    "DDPM_SDXL",
    "TrainConfig",
    "TrainState",
    "TrainStateError",
    "add_noise",
    "alphas_cumprod",
    "diffusion_loss",
    "fold_adapter",
    "init_adapter",
    "init_train_state",
    "load_checkpoint",
    "make_loss",
    "make_optimizer",
    "make_train_step",
    "run_training",
    "save_checkpoint",
    "scheduler_config",
    "train",
    "train_fingerprint",
    "train_state_path",
]

# SDXL base 1.0 scheduler settings used by the reference's DDPMScheduler (docs/math.md §6).
DDPM_SDXL = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


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
            raise ValueError(
                f"{path}: prediction_type {raw['prediction_type']!r}; only 'epsilon' is supported"
            )
        cfg.update({k: raw[k] for k in DDPM_SDXL if k in raw})
    return cfg


def init_adapter(
    config_or_table: Mapping,
    nblocks: int = 32,
    *,
    dtype=jnp.float32,
    scales: bool = True,
) -> GSAdapter:
    """Zero-initialised trainable adapter for every attention projection of a UNet (docs/math.md §1.1, 2).

    ``L = R = 0`` ``[nb, n/nb, n/nb]`` (``n`` = the projection's input width) and unit scales of the
    output width, named as in the reference checkpoint (docs/math.md §5).

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
        s = jnp.stack(
            [
                adapter.scales[spec.name].astype(dt) if spec.name in adapter.scales else ones
                for spec in specs
            ]
        )
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
    adapter: GSAdapter,
    params,
    batch: Mapping,
    key,
    *,
    unet,
    plan: FoldPlan,
    abar,
    compute_dtype=None,
    apply: str = "fold",
):
    """Epsilon-prediction MSE of the UNet with ``adapter`` folded in (docs/math.md §6); returns a scalar.

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
        {
            "text_embeds": jnp.asarray(batch["text_embeds"]).astype(cdt),
            "time_ids": jnp.asarray(batch["time_ids"]).astype(cdt),
        },
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
    unet,
    params,
    adapter: GSAdapter,
    *,
    config=None,
    noise_schedule: Mapping | None = None,
    compute_dtype=None,
    apply: str = "fold",
):
    """``loss(adapter, params, batch, key)`` bound to ``unet``, its fold plan and the DDPM schedule
    (``apply``: see :func:`diffusion_loss`)."""
    if apply not in ("fold", "onthefly"):
        raise ValueError(f"apply must be 'fold' or 'onthefly', got {apply!r}")
    plan = FoldPlan.build(params, adapter, config=config)
    x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    abar = jnp.asarray(
        alphas_cumprod(**dict(noise_schedule or DDPM_SDXL)), jnp.float64 if x64 else jnp.float32
    )

    def loss(adapter, params, batch, key):
        return diffusion_loss(
            adapter,
            params,
            batch,
            key,
            unet=unet,
            plan=plan,
            abar=abar,
            compute_dtype=compute_dtype,
            apply=apply,
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
    """``optax.adamw`` with the reference defaults (docs/math.md §6), after optional global-norm clipping.

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
    """Options of :func:`train` (defaults = the reference recipe, docs/math.md §6, except ``steps``)."""

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


@dataclass(frozen=True)
class TrainState:
    """Everything a run needs to continue as if it had never stopped (docs/math.md §6 loop state).

    Attributes:
      step: updates done so far (the next step is ``step + 1``).
      adapter: raw-parameter float32 :class:`GSAdapter` after ``step`` updates.
      opt_state: the optax state of :func:`make_optimizer` (AdamW ``count, mu, nu``; clipping has none).
      key: raw ``uint32`` PRNG key data; the next step draws ``t, eps`` from ``split(key)[1]``.
      data_rng: ``numpy`` bit-generator state (PCG64) that draws the next batch.
      losses: ``[step]`` float64 per-step losses so far.
    """

    step: int
    adapter: GSAdapter
    opt_state: Any
    key: np.ndarray
    data_rng: dict
    losses: np.ndarray


class TrainStateError(ValueError):
    """A training state cannot be resumed; the message names the file and what is wrong.

    Attributes:
      path: the offending file.
      settings: names of the :func:`train_fingerprint` entries that differ (empty otherwise).
    """

    def __init__(self, message: str, *, path: str | os.PathLike = "", settings: Sequence[str] = ()):
        super().__init__(message)
        self.path = os.fspath(path)
        self.settings = tuple(settings)


STATE_FORMAT = "orthofuse_jax.train_state"
STATE_VERSION = 1


def _optimizer(cfg: TrainConfig):
    return make_optimizer(
        cfg.learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )


def _host_copy(tree):
    # np.array copies: a zero-copy view of a CPU buffer would be invalidated when the next step donates it
    return jax.tree_util.tree_map(np.array, tree)


def init_train_state(
    unet_config: Mapping, cfg: TrainConfig, *, adapter: GSAdapter | None = None
) -> TrainState:
    """The state at step 0: ``adapter`` (default :func:`init_adapter`), fresh AdamW moments, ``cfg.seed`` RNGs."""
    if adapter is None:
        adapter = init_adapter(unet_config, cfg.nblocks, scales=cfg.train_scales)
    adapter = adapter.astype(jnp.float32)
    return TrainState(
        step=0,
        adapter=adapter,
        opt_state=_optimizer(cfg).init(adapter),
        key=np.asarray(jax.random.PRNGKey(cfg.seed)),
        data_rng=dict(np.random.default_rng(cfg.seed).bit_generator.state),
        losses=np.zeros((0,), np.float64),
    )


def run_training(
    unet,
    params,
    unet_config: Mapping,
    datasets: Sequence,
    cfg: TrainConfig,
    *,
    mix: Sequence[float] | None = None,
    state: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Run steps ``state.step + 1 .. cfg.steps`` of the training loop (see :func:`train`).

    The loop is a function of the state alone: batch ``i`` comes from dataset
    ``schedule_datasets(...)[i]`` (a prefix that does not depend on ``cfg.steps``) drawn with
    ``state.data_rng``; ``t, eps`` from ``split(state.key)``. So running ``m`` steps, saving
    (:func:`save_checkpoint`), loading (:func:`load_checkpoint`) and running to ``n`` is the
    computation of one uninterrupted ``n``-step run: the same jitted step on the same float32
    values, so bit-identical wherever XLA's kernels are deterministic (tested on CPU; on GPU see
    ``--xla_gpu_deterministic_ops``).

    Args:
      unet, params, unet_config, datasets, cfg, mix: as :func:`train`.
      state: where to start (default :func:`init_train_state`); ``state.step <= cfg.steps``. It is
        not modified (its arrays are copied before the first step donates them).
      on_checkpoint: called with a host copy of the state after every ``cfg.checkpoint_every``
        steps (absolute step numbers, so a resumed run checkpoints where the uninterrupted one does),
        except after the last step.
    Returns:
      The host (numpy) :class:`TrainState` after ``cfg.steps`` updates; ``losses`` holds all steps,
      those before ``state.step`` included.
    """
    from tqdm.auto import tqdm

    from .train_data import schedule_datasets

    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if state is None:
        state = init_train_state(unet_config, cfg)
    if not 0 <= state.step <= cfg.steps:
        raise ValueError(
            f"the state is at step {state.step}; steps must be >= that, got {cfg.steps}"
        )
    # fresh device copies: the jitted step donates its inputs, and ``state`` stays the caller's
    adapter = jax.tree_util.tree_map(jnp.array, state.adapter).astype(jnp.float32)
    opt_state = jax.tree_util.tree_map(jnp.array, state.opt_state)
    compute = jnp.bfloat16 if cfg.bf16 else None
    if cfg.bf16:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    loss_fn = make_loss(
        unet,
        params,
        adapter,
        config=unet_config,
        noise_schedule=cfg.noise_schedule,
        compute_dtype=compute,
        apply=cfg.apply,
    )
    step_fn = make_train_step(loss_fn, _optimizer(cfg))
    order = schedule_datasets(len(datasets), cfg.steps, mix)
    rng = np.random.default_rng()
    rng.bit_generator.state = state.data_rng
    key = jnp.asarray(state.key)
    losses = [float(x) for x in np.asarray(state.losses)]

    def snapshot(done):
        ad, opt = _host_copy((adapter, opt_state))
        return TrainState(
            done, ad, opt, np.array(key), rng.bit_generator.state, np.asarray(losses, np.float64)
        )

    ema = None
    bar = tqdm(
        range(state.step, cfg.steps),
        desc="training",
        initial=state.step,
        total=cfg.steps,
        disable=not cfg.progress,
    )
    for i in bar:
        batch = datasets[order[i]].sample(rng, cfg.batch_size)
        key, sub = jax.random.split(key)
        adapter, opt_state, loss = step_fn(adapter, opt_state, params, batch, sub)
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {i + 1}; lower the learning rate or set max_grad_norm"
            )
        losses.append(loss)
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        bar.set_postfix(loss=f"{loss:.4f}", avg=f"{ema:.4f}")
        done = i + 1
        if (
            on_checkpoint is not None
            and cfg.checkpoint_every
            and done % cfg.checkpoint_every == 0
            and done < cfg.steps
        ):
            on_checkpoint(snapshot(done))
    return snapshot(cfg.steps)


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
    ``mix``, default equal: concept, style, concept, ... for two). :func:`run_training` is the
    same loop with the full :class:`TrainState` in and out (to save and resume).

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
    hook = None if on_checkpoint is None else (lambda s: on_checkpoint(s.step, s.adapter))
    state = init_train_state(unet_config, cfg, adapter=adapter)
    final = run_training(
        unet, params, unet_config, datasets, cfg, mix=mix, state=state, on_checkpoint=hook
    )
    return jax.tree_util.tree_map(jnp.asarray, final.adapter), final.losses


# ----------------------------------------------------------------------------------------------
# saving and resuming: the reference-format adapter plus a state file beside it


def train_state_path(checkpoint: str | os.PathLike) -> str:
    """The state file beside an adapter checkpoint: ``ADAPTER-step200.safetensors`` -> ``ADAPTER-step200.opt.npz``."""
    stem, _ = os.path.splitext(os.fspath(checkpoint))
    return f"{stem}.opt.npz"


def _data_fingerprint(data) -> str:
    lat = getattr(data, "latents", None)
    if lat is None:
        return type(data).__name__
    h = hashlib.sha256()
    for name in ("latents", "std", "prompt_embeds", "pooled", "original_sizes"):
        a = getattr(data, name, None)
        h.update(name.encode())
        if a is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    crop = tuple(int(c) for c in data.crop)
    rc, f = bool(getattr(data, "random_crop", False)), int(getattr(data, "vae_scale_factor", 8))
    h.update(repr((crop, rc, f)).encode())
    shape = np.shape(lat)
    desc = f"{shape[0]} latents {'x'.join(map(str, shape[1:]))}, crop {crop[0]}x{crop[1]}"
    desc += ", random crops" if rc else ""
    desc += ", posterior std" if getattr(data, "std", None) is not None else ""
    return f"{desc}, sha256 {h.hexdigest()[:16]}"


def train_fingerprint(
    cfg: TrainConfig, datasets: Sequence = (), mix: Sequence[float] | None = None
) -> dict[str, str]:
    """Settings a resumed run must share with the run that saved the state (compared as strings).

    Everything that changes the computation: nblocks, the AdamW settings and ``max_grad_norm``,
    batch size, seed, scales on/off, bf16, the DDPM schedule, the data sources (count, mix and a
    sha256 of each :class:`~.train_data.LatentData`). Not included (free to change on resume):
    ``steps``, ``checkpoint_every``, ``progress`` and ``apply`` (the same loss, computed in another
    order: a resumed run with another ``apply`` agrees to float32 rounding, not bit for bit).
    """
    p = (
        np.full(len(datasets), 1.0 / max(1, len(datasets)))
        if mix is None
        else np.asarray(mix, np.float64)
    )
    fp = {
        "nblocks": str(int(cfg.nblocks)),
        "learning_rate": repr(float(cfg.learning_rate)),
        "b1": repr(float(cfg.b1)),
        "b2": repr(float(cfg.b2)),
        "eps": repr(float(cfg.eps)),
        "weight_decay": repr(float(cfg.weight_decay)),
        "max_grad_norm": "off" if cfg.max_grad_norm is None else repr(float(cfg.max_grad_norm)),
        "batch_size": str(int(cfg.batch_size)),
        "seed": str(int(cfg.seed)),
        "train_scales": str(bool(cfg.train_scales)).lower(),
        "bf16": str(bool(cfg.bf16)).lower(),
        "noise_schedule": json.dumps(dict(cfg.noise_schedule), sort_keys=True),
        "datasets": str(len(datasets)),
        "mix": json.dumps([float(x) for x in p]),
    }
    for i, d in enumerate(datasets):
        fp[f"data[{i}]"] = _data_fingerprint(d)
    return fp


def _adapter_digest(adapter: GSAdapter) -> str:
    from ..fusion.io import adapter_to_tensors

    h = hashlib.sha256()
    for k, v in sorted(adapter_to_tensors(adapter).items()):
        h.update(f"{k}{v.shape}".encode() + np.ascontiguousarray(v, np.float32).tobytes())
    return h.hexdigest()


def _flat(tree) -> tuple[list[tuple[str, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [
        ("opt_state/" + jax.tree_util.keystr(p, simple=True, separator="/"), v) for p, v in leaves
    ], treedef


def save_checkpoint(
    path: str | os.PathLike,
    state: TrainState,
    fingerprint: Mapping[str, str],
    *,
    metadata: Mapping[str, str] | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> tuple[str, str]:
    """Write ``state`` as a reference-format adapter at ``path`` plus its state file beside it.

    The adapter file is exactly what :func:`~orthofuse_jax.fusion.io.save_adapter` writes (docs/math.md §5;
    ``metadata`` goes into its safetensors header, no extra tensors). The state file
    (:func:`train_state_path`) is an ``.npz`` of the flattened optimiser state, one array per
    ``tree_flatten_with_path`` key (``opt_state/0/mu/stacks/nb32_b20/L``, ...), ``key`` (raw PRNG
    key), ``losses`` and ``__meta__`` (JSON: format, step, ``fingerprint``, numpy RNG state and the
    sha256 of the adapter tensors, which ties the two files together). Both writes are atomic and
    refuse any path in ``inputs``.

    Returns:
      ``(adapter path, state path)``.
    """
    from ..fusion.io import AdapterFileError, atomic_write_bytes, check_output_path, save_adapter

    spath = train_state_path(path)
    check_output_path(spath, inputs)
    arrays = {k: np.asarray(v) for k, v in _flat(state.opt_state)[0]}
    arrays["key"] = np.asarray(state.key)
    arrays["losses"] = np.asarray(state.losses, np.float64)
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": int(state.step),
        "checkpoint": os.path.basename(os.fspath(path)),
        "adapter_sha256": _adapter_digest(state.adapter),
        "data_rng": state.data_rng,
        "fingerprint": dict(fingerprint),
    }
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    save_adapter(path, state.adapter, metadata=metadata, inputs=inputs)
    try:
        atomic_write_bytes(spath, buf.getvalue())
    except OSError as e:
        raise AdapterFileError(f"{spath}: cannot write file ({e.strerror or e})") from None
    return os.fspath(path), spath


def _read_state_file(spath: str, ckpt: str) -> tuple[dict, dict[str, np.ndarray]]:
    if not os.path.isfile(spath):
        raise TrainStateError(
            f"{spath}: optimizer-state file of {ckpt} does not exist (it is written beside every checkpoint "
            "by orthofuse-jax train); cannot resume without it",
            path=spath,
        )
    try:
        with np.load(spath, allow_pickle=False) as f:
            data = {k: np.asarray(f[k]) for k in f.files}
        meta = json.loads(str(data.pop("__meta__")))
    except KeyError:
        raise TrainStateError(
            f"{spath}: not a training-state file (no '__meta__' entry)", path=spath
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TrainStateError(
            f"{spath}: not a readable training-state file ({type(e).__name__}: {e})", path=spath
        ) from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != STATE_FORMAT:
        raise TrainStateError(
            f"{spath}: not a training-state file (format {str(fmt)[:40]!r}, expected {STATE_FORMAT!r})",
            path=spath,
        )
    if meta.get("version") != STATE_VERSION:
        raise TrainStateError(
            f"{spath}: state version {meta.get('version')!r}, this version reads {STATE_VERSION}",
            path=spath,
        )
    for k, typ in (
        ("step", int),
        ("fingerprint", dict),
        ("data_rng", dict),
        ("adapter_sha256", str),
    ):
        if not isinstance(meta.get(k), typ) or isinstance(meta.get(k), bool):
            raise TrainStateError(
                f"{spath}: corrupt metadata: {k!r} is {meta.get(k)!r}", path=spath
            )
    return meta, data


def _check_layers(
    adapter: GSAdapter, table: Mapping[str, AttentionLayer], nblocks: int, ckpt: str
) -> None:
    """The checkpoint's layers, block shapes and scales must be those :func:`init_adapter` gives the model."""
    got = {n: tuple(np.shape(L)) for n, (L, _) in to_layers(adapter).items()}
    missing, extra = sorted(set(table) - set(got)), sorted(set(got) - set(table))
    if missing:
        raise TrainStateError(
            f"{ckpt}: layer {missing[0]!r} of the model is missing ({len(missing)} missing in all)",
            path=ckpt,
        )
    if extra:
        raise TrainStateError(
            f"{ckpt}: layer {extra[0]!r} is not in the model ({len(extra)} extra in all)", path=ckpt
        )
    for name, spec in table.items():
        b = spec.n_in // nblocks
        if got[name] != (nblocks, b, b):
            raise TrainStateError(
                f"{ckpt}: layer {name!r} has blocks {list(got[name])}; the model with nblocks={nblocks} needs "
                f"{[nblocks, b, b]}",
                path=ckpt,
            )


def load_checkpoint(
    path: str | os.PathLike,
    unet_config: Mapping,
    cfg: TrainConfig,
    fingerprint: Mapping[str, str],
    *,
    labels: Mapping[str, str] | None = None,
) -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint` and check it against this run.

    Args:
      path: the adapter ``.safetensors``; its state file is :func:`train_state_path` of it.
      unet_config: the model's UNet config (layers and widths).
      cfg: this run's :class:`TrainConfig` (optimiser structure, nblocks, scales).
      fingerprint: this run's :func:`train_fingerprint`; every entry must equal the saved one.
      labels: names to show for fingerprint entries (e.g. ``{"learning_rate": "--lr"}``).
    Returns:
      The :class:`TrainState` (numpy leaves) to pass to :func:`run_training`.
    Raises:
      AdapterFileError: the adapter file is unreadable, malformed or non-finite.
      TrainStateError: naming the file: missing or unreadable state file, other settings (each
        differing entry with both values), layers or shapes that do not fit the model and
        ``cfg.nblocks``, missing/extra/misshapen/non-finite optimiser entries, a state written for
        another adapter file.
    """
    from ..fusion.io import load_adapter

    ckpt = os.fspath(path)
    spath = train_state_path(ckpt)
    loaded = load_adapter(ckpt)
    meta, data = _read_state_file(spath, ckpt)
    label = dict(labels or {})
    saved_fp = meta["fingerprint"]
    diffs = [
        k
        for k in sorted(set(saved_fp) | set(fingerprint), key=lambda k: (k.startswith("data"), k))
        if saved_fp.get(k) != fingerprint.get(k)
    ]
    if diffs:
        what = "; ".join(
            f"{label.get(k, k)}: the state has {saved_fp.get(k, '(none)')}, this run {fingerprint.get(k, '(none)')}"
            for k in diffs
        )
        raise TrainStateError(
            f"{spath}: saved by a run with other settings: {what}", path=spath, settings=diffs
        )

    table = _table(unet_config)
    _check_layers(loaded, table, cfg.nblocks, ckpt)
    if set(loaded.scales) != (set(table) if cfg.train_scales else set()):
        raise TrainStateError(
            f"{ckpt}: has {len(loaded.scales)} scale vectors; a run {'with' if cfg.train_scales else 'without'} "
            f"scales needs {len(table) if cfg.train_scales else 0}",
            path=ckpt,
        )
    for name, s in loaded.scales.items():
        if np.shape(s) != (table[name].n_out,):
            raise TrainStateError(
                f"{ckpt}: scale of layer {name!r} has shape {list(np.shape(s))}, "
                f"the model needs [{table[name].n_out}]",
                path=ckpt,
            )
    layers = to_layers(loaded)
    adapter = from_layers(
        {n: layers[n] for n in table},
        {n: loaded.scales[n] for n in table if n in loaded.scales},
        orthogonal=False,
        dtype=jnp.float32,
    )

    step = meta["step"]
    if step < 0:
        raise TrainStateError(f"{spath}: corrupt metadata: step {step}", path=spath)
    losses = data.pop("losses", None)
    if losses is None or losses.shape != (step,) or not np.all(np.isfinite(losses)):
        raise TrainStateError(
            f"{spath}: 'losses' must be {step} finite values (one per step), got "
            f"{None if losses is None else list(losses.shape)}",
            path=spath,
        )
    key_ref = np.asarray(jax.random.PRNGKey(0))
    key = data.pop("key", None)
    if key is None or key.shape != key_ref.shape or key.dtype != key_ref.dtype:
        raise TrainStateError(
            f"{spath}: 'key' must be {key_ref.dtype} {list(key_ref.shape)} (raw PRNG key), got "
            f"{None if key is None else f'{key.dtype} {list(key.shape)}'}",
            path=spath,
        )
    try:
        np.random.default_rng().bit_generator.state = meta["data_rng"]
    except (TypeError, ValueError, KeyError) as e:
        raise TrainStateError(
            f"{spath}: corrupt data RNG state ({type(e).__name__}: {e})", path=spath
        ) from None

    expected, treedef = _flat(jax.eval_shape(_optimizer(cfg).init, adapter))
    leaves = []
    for name, spec in expected:
        arr = data.pop(name, None)
        if arr is None:
            raise TrainStateError(
                f"{spath}: entry {name!r} of the optimizer state for this model and nblocks="
                f"{cfg.nblocks} is missing",
                path=spath,
            )
        if arr.shape != spec.shape or arr.dtype != spec.dtype:
            raise TrainStateError(
                f"{spath}: entry {name!r} is {arr.dtype} {list(arr.shape)}; this model with nblocks="
                f"{cfg.nblocks} needs {np.dtype(spec.dtype)} {list(spec.shape)}",
                path=spath,
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = ~np.isfinite(arr)
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise TrainStateError(
                f"{spath}: entry {name!r}: {int(bad.sum())} non-finite value(s), first "
                f"{float(arr[idx])} at index {idx}",
                path=spath,
            )
        leaves.append(arr)
    if data:
        extra = sorted(data)
        raise TrainStateError(
            f"{spath}: entry {extra[0]!r} does not belong to the optimizer state of this model "
            f"({len(extra)} extra in all)",
            path=spath,
        )
    count = [int(a) for (n, _), a in zip(expected, leaves) if n.endswith("/count")]
    if any(c != step for c in count):
        raise TrainStateError(
            f"{spath}: AdamW count {count[0]} does not match step {step}", path=spath
        )
    if _adapter_digest(adapter) != meta["adapter_sha256"]:
        raise TrainStateError(
            f"{spath}: belongs to another adapter than {ckpt} (sha256 of its tensors differs; was one of the two "
            "files replaced?)",
            path=spath,
        )
    return TrainState(
        step,
        adapter,
        jax.tree_util.tree_unflatten(treedef, leaves),
        key,
        meta["data_rng"],
        losses.astype(np.float64),
    )
