"""Train GS orthogonal adapters on a frozen Flax SDXL UNet with optax (docs/math.md §6).

The trainable state is a :class:`~orthofuse_jax.fusion.adapter.GSAdapter` of raw Cayley
parameters (``L = R = 0``, so every block is ``Cay(0) = I``) and per-channel scales (ones) for
every ``to_q/to_k/to_v/to_out`` projection of every ``attn1``/``attn2`` (docs/math.md §2); at step 0 the
model is exactly the base model. The loss is the epsilon-prediction MSE (docs/math.md §6)

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0..T-1},   eps ~ N(0, I)
    loss = mean( (eps_theta(x_t, t, c) - eps)^2 )

with the adapter applied to the attention projections. The reference rotates the projection
input at every call, ``s * (W (Q x))``; here the adapter is folded into the kernels inside the
loss, ``K_eff = (Q^T K) * s`` (the same product reassociated; :func:`~.patch.fold_adapter`, the
fold that patches a UNet for generation, traced), so gradients reach ``L, R`` through
``Q = P^T BD(Cay(L)) P BD(Cay(R))`` and the scales through ``K_eff``; the base parameters are
arguments that are never differentiated.

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

Resuming: the loop, :func:`run_training`, is a function of a :class:`TrainState` (step, adapter,
optax state, PRNG key, numpy data-RNG state, losses). :mod:`.checkpoint` saves a state as the
reference-format adapter plus a state file beside it and loads it back, checked against the model
and the run's settings; :func:`run_training` continues it. A run stopped at step ``m`` and resumed
to ``n`` is the uninterrupted ``n``-step computation (bit for bit on CPU in float32, tested).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..fusion.adapter import GSAdapter, from_layers
from ..geometry import cayley
from .generate import alphas_cumprod
from .layers import layer_table
from .mesh import DATA_AXIS, data_size, replicate, shard_batch
from .patch import FoldPlan, fold_adapter

__all__ = [
    "DDPM_SDXL",
    "TrainConfig",
    "TrainState",
    "add_noise",
    "check_data_parallel",
    "diffusion_loss",
    "init_adapter",
    "init_train_state",
    "make_loss",
    "make_optimizer",
    "make_train_step",
    "run_training",
    "scheduler_config",
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
    table = layer_table(config_or_table)
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
    batch_sharding=None,
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
      batch_sharding: optional ``NamedSharding`` of the batch axis (``P("data")``) laid on the drawn
        ``t`` and ``eps`` too, so each device noises its own share of the batch (the values do not
        depend on it: JAX's random bits are independent of the layout).
    """
    x0 = jnp.asarray(batch["latents"])
    loss_dt = jnp.promote_types(x0.dtype, jnp.float32)
    x0 = x0.astype(loss_dt)
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, abar.shape[0])
    noise = jax.random.normal(kn, x0.shape, loss_dt)
    if batch_sharding is not None:
        t, noise = jax.lax.with_sharding_constraint((t, noise), batch_sharding)
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
    batch_sharding=None,
):
    """``loss(adapter, params, batch, key)`` bound to ``unet``, its fold plan and the DDPM schedule
    (``apply``, ``batch_sharding``: see :func:`diffusion_loss`)."""
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
            batch_sharding=batch_sharding,
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


def make_train_step(loss_fn: Callable, optimizer, *, donate: bool = True, mesh=None):
    """Jitted ``(adapter, opt_state, params, batch, key) -> (adapter, opt_state, loss)``.

    Only ``adapter`` is differentiated; ``params`` is a plain (frozen) argument. With ``donate``
    the old adapter and optimiser state buffers are reused for the new ones. With a ``mesh``
    (data parallel; inputs placed by :func:`~.mesh.replicate` and :func:`~.mesh.shard_batch`) the
    outputs are replicated over it: the loss is the mean over the global batch, so its gradient is
    the average of the devices' gradients (an all-reduce over ``data``) by construction.
    """
    import optax

    def step(adapter, opt_state, params, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    donated = (0, 1) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donated)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return jax.jit(step, donate_argnums=donated, out_shardings=NamedSharding(mesh, P()))


@dataclass
class TrainConfig:
    """Options of :func:`run_training` (defaults = the reference recipe, docs/math.md §6, except ``steps``).

    ``mesh``: ``None`` (one device) or a :class:`jax.sharding.Mesh` with a ``data`` axis
    (:func:`~.mesh.make_mesh`) to train data parallel: each batch split over ``data``, the UNet,
    adapter and optimiser state replicated; ``batch_size`` must be divisible by its size.
    """

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
    mesh: Any = None

    def optimizer(self):
        """The optimiser of these settings: :func:`make_optimizer` (AdamW, optional clipping)."""
        return make_optimizer(
            self.learning_rate,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )


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


def _host_copy(tree):
    # np.array copies: a zero-copy view of a CPU buffer would be invalidated when the next step donates it
    return jax.tree_util.tree_map(np.array, tree)


def check_data_parallel(batch_size: int, mesh) -> None:
    """``ValueError`` (one line) unless ``mesh``'s ``data`` size divides the global ``batch_size``."""
    if mesh is None:
        return
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"the training mesh needs a {DATA_AXIS!r} axis to split batches over, got axes "
            f"{list(mesh.axis_names)}"
        )
    d = data_size(mesh)
    if batch_size % d:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the mesh's data size {d} "
            "(every device takes batch_size / data items)"
        )


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
        opt_state=cfg.optimizer().init(adapter),
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
    """Train one adapter on ``datasets``: steps ``state.step + 1 .. cfg.steps`` of the loop.

    One dataset trains a concept or a style adapter, two the joint baseline. Each step draws a
    batch from one dataset; with several, step ``i`` uses dataset ``k`` in the deterministic
    interleave of :func:`~.train_data.schedule_datasets` (exact proportions ``mix``, default
    equal: concept, style, concept, ... for two).

    The loop is a function of the state alone: batch ``i`` comes from dataset
    ``schedule_datasets(...)[i]`` (a prefix that does not depend on ``cfg.steps``) drawn with
    ``state.data_rng``; ``t, eps`` from ``split(state.key)``. So running ``m`` steps, saving
    (:func:`~.checkpoint.save_checkpoint`), loading (:func:`~.checkpoint.load_checkpoint`) and
    running to ``n`` is the computation of one uninterrupted ``n``-step run: the same jitted step
    on the same float32 values, so bit-identical wherever XLA's kernels are deterministic (tested
    on CPU; on GPU see ``--xla_gpu_deterministic_ops``).

    Args:
      unet, params, unet_config: the frozen Flax UNet (``unet.dtype`` bf16 for bf16 compute).
      datasets: objects with ``sample(rng, batch_size) -> batch dict`` (:class:`~.train_data.LatentData`).
      cfg: :class:`TrainConfig`.
      mix: per-dataset proportions (sum 1).
      state: where to start (default :func:`init_train_state`: the adapter of :func:`init_adapter`;
        pass ``init_train_state(..., adapter=...)`` to start from another); ``state.step <=
        cfg.steps``. It is not modified (its arrays are copied before the first step donates them).
      on_checkpoint: called with a host copy of the state after every ``cfg.checkpoint_every``
        steps (absolute step numbers, so a resumed run checkpoints where the uninterrupted one does),
        except after the last step; the caller saves it (:func:`~.checkpoint.save_checkpoint`).
    Returns:
      The host (numpy) :class:`TrainState` after ``cfg.steps`` updates: ``adapter`` is the trained
      float32 raw-parameter adapter and ``losses`` holds all steps, those before ``state.step``
      included.
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
    mesh = cfg.mesh
    check_data_parallel(cfg.batch_size, mesh)
    # fresh device copies: the jitted step donates its inputs, and ``state`` stays the caller's
    adapter = jax.tree_util.tree_map(jnp.array, state.adapter).astype(jnp.float32)
    opt_state = jax.tree_util.tree_map(jnp.array, state.opt_state)
    compute = jnp.bfloat16 if cfg.bf16 else None
    if cfg.bf16:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    batch_sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
        params, adapter, opt_state = replicate((params, adapter, opt_state), mesh)

    def place(batch):
        return batch if mesh is None else shard_batch(batch, mesh)

    loss_fn = make_loss(
        unet,
        params,
        adapter,
        config=unet_config,
        noise_schedule=cfg.noise_schedule,
        compute_dtype=compute,
        apply=cfg.apply,
        batch_sharding=batch_sharding,
    )
    step_fn = make_train_step(loss_fn, cfg.optimizer(), mesh=mesh)
    order = schedule_datasets(len(datasets), cfg.steps, mix)
    rng = np.random.default_rng()
    rng.bit_generator.state = state.data_rng
    key = jnp.asarray(state.key)
    if mesh is not None:
        key = replicate(key, mesh)
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
        batch = place(datasets[order[i]].sample(rng, cfg.batch_size))
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
