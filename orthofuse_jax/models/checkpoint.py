"""Saving and resuming training: the reference-format adapter plus a state file beside it.

A checkpoint is two files. The adapter ``ADAPTER.safetensors`` is exactly what
:func:`~orthofuse_jax.fusion.io.save_adapter` writes (docs/math.md §5, unchanged: the reference and
``orthofuse-jax fuse`` read it). The rest of the :class:`~.train.TrainState` goes to
``ADAPTER.opt.npz`` beside it (:func:`train_state_path`): the optimiser state (AdamW's ``mu, nu``:
about twice the adapter), the PRNG key, the numpy data-RNG state, the losses so far, the run's
:func:`train_fingerprint` and the sha256 of the adapter tensors, which ties the two files together.

:func:`save_checkpoint` writes both; :func:`load_checkpoint` reads them back and checks them against
the model, the run's settings and each other, raising :class:`TrainStateError` naming the file and
what is wrong. :func:`~.train.run_training` continues from the state it returns: a run stopped at
step ``m`` and resumed to ``n`` is the uninterrupted ``n``-step computation (bit for bit on CPU in
float32, tested).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..fusion.adapter import GSAdapter, from_layers, to_layers
from .layers import AttentionLayer, layer_table
from .train import TrainConfig, TrainState

__all__ = [
    "TrainStateError",
    "load_checkpoint",
    "save_checkpoint",
    "train_fingerprint",
    "train_state_path",
]


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
    """The checkpoint's layers, block shapes and scales must be those :func:`~.train.init_adapter` gives the model."""
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
      cfg: this run's :class:`~.train.TrainConfig` (optimiser structure, nblocks, scales).
      fingerprint: this run's :func:`train_fingerprint`; every entry must equal the saved one.
      labels: names to show for fingerprint entries (e.g. ``{"learning_rate": "--lr"}``).
    Returns:
      The :class:`~.train.TrainState` (numpy leaves) to pass to :func:`~.train.run_training`.
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

    table = layer_table(unet_config)
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

    expected, treedef = _flat(jax.eval_shape(cfg.optimizer().init, adapter))
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
