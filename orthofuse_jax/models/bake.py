"""Bake a GS adapter into the PyTorch weights of a diffusers UNet folder (docs/math.md §1.3, §2).

The reference adapter computes ``y = s * (W (Q x)) + b`` for every adapted projection (``to_q``,
``to_k``, ``to_v``, ``to_out.0`` of ``attn1``/``attn2``), with ``W`` the torch ``Linear`` weight
``[out, in]``. The baked weight is

    W_eff = diag(s) W Q,      row by row  W_eff[i] = s[i] * (W[i] @ Q)

computed with the structured GS product on the rows of ``W`` (:func:`~orthofuse_jax.geometry.gs_apply_transpose`,
``y = x @ Q``), never a dense ``Q``. Biases: the reference processor scales the output of
``attn.to_q/k/v`` *including* their bias (``q = q_scale * to_q(Q x)``), but adds ``to_out.0``'s bias
after ``out_scale``; so for reference-format layers a ``to_q/k/v`` bias becomes ``s * b`` (SDXL has
none) and the ``to_out.0`` bias is kept. PEFT OFT applies its ``oft_s`` to the weight only, so
for PEFT layers every bias is kept.

Output-side adapters (``adapter.side == "output"``: LyCORIS ``diag-oft``, kohya OFT) rotate the
weight's rows instead, as LyCORIS's ``einsum("k n m, k n ... -> k m ...", R, W)`` does:

    W_eff = diag(s) Q^T W,     W of shape [out, ...] flattened to [out, rest] (conv weights too)

computed as ``(W^T Q)^T`` with the same structured product; biases are kept. Their layers are
matched by :func:`weight_key`, or else by the module path with dots replaced by ``_`` (how those
files name layers), which must then match exactly one weight.

The output is a diffusers UNet folder (``config.json`` copied, one ``diffusion_pytorch_model
.safetensors``) that ``UNet2DConditionModel.from_pretrained`` loads. Tensors are streamed one at a
time: read, folded in float32 if adapted, cast once to the output dtype, written; the peak memory
is the adapter plus about one tensor. Everything is checked before the first byte is written,
the folder is written beside ``out_dir`` under a temporary name and renamed into place, and the
inputs are only read. Needs numpy and JAX only (no torch, flax or diffusers).

With ``single_file``, the same pass also writes each tensor into one ``.safetensors`` file with the
original SDXL keys (``model.diffusion_model.*``, the UNet only) that single-file loaders read:
ComfyUI's diffusion-model loader, diffusers' ``UNet2DConditionModel.from_single_file``. Its key
names come from diffusers' own conversion (:mod:`.single_file`), so that option needs diffusers
and torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._safetensors import AdapterFileError, SafetensorsFile, header_bytes, is_peft_keys
from ..fusion.adapter import GSAdapter, to_orthogonal
from ..fusion.io import check_output_folder, fsync_dir, install_folder, load_adapter
from ..geometry import gs_apply_transpose
from ._backbone import CONFIG_NAME, WEIGHTS_NAME, MissingModelFileError, weight_files
from .single_file import original_unet_keys

__all__ = ["DTYPES", "BakeResult", "bake_unet", "unet_folder", "weight_key"]

DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
"""``--dtype`` names -> safetensors dtypes of the baked weights."""

# reference GS layer suffix -> torch module of the projection inside a diffusers Attention
_TORCH_PROJECTIONS = {
    "to_q_moft": "to_q",
    "to_k_moft": "to_k",
    "to_v_moft": "to_v",
    "to_out_moft": "to_out.0",
}
_NUMPY: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
}


@dataclass(frozen=True)
class BakeResult:
    """What :func:`bake_unet` wrote: the folder, the UNet folder read, layers folded, tensors written
    (by dtype), and the single file in the original SDXL layout if one was asked for."""

    out_dir: Path
    unet_dir: Path
    layers: int
    tensors: int
    dtypes: dict[str, int]
    single_file: Path | None = None


def unet_folder(model: str | os.PathLike) -> Path:
    """The UNet folder of a local diffusers model: ``model/unet`` or ``model`` itself (with ``config.json``).

    Raises :class:`MissingModelFileError` naming the missing folder or config.
    """
    path = Path(model)
    if not path.is_dir():
        raise MissingModelFileError(f"model folder {str(path)!r} does not exist")
    for folder in (path / "unet", path):
        if (folder / CONFIG_NAME).is_file():
            return folder
    where = path / "unet" if (path / "unet").is_dir() else path
    raise MissingModelFileError(
        f"missing model file {str(where / CONFIG_NAME)!r} (no UNet config: give a diffusers model "
        "folder with unet/ or a UNet folder)"
    )


def weight_key(layer: str) -> str:
    """The torch state-dict key of the weight an adapter layer rotates.

    Reference names (``<attention>.processor.to_q_moft``; ``to_out_moft`` -> ``to_out.0``) and PEFT
    module names (``<attention>.to_q``, ``<attention>.to_out.0``, as :func:`load_adapter` returns
    them, an optional leading ``unet.`` dropped) map to ``<attention>.<projection>.weight``.
    """
    head, _, last = layer.rpartition(".")
    if last in _TORCH_PROJECTIONS and head:
        head = head.removesuffix(".processor")
        return f"{head}.{_TORCH_PROJECTIONS[last]}.weight"
    return f"{layer.removeprefix('unet.')}.weight"


@dataclass(frozen=True)
class _Fold:
    layer: str
    stack: str
    index: int
    scale: bool  # the adapter has a scale vector for the layer
    bias_key: str | None  # a bias scaled with the output (reference to_q/k/v only)
    output: bool = False  # rotate the weight's rows (output features) instead of its columns


@jax.jit
def _fold_weight(W, L_stack, R_stack, index, s):
    """``diag(s) W Q`` in float32: each row ``W[i] @ Q`` by the structured GS product, then scaled."""
    L = jax.lax.dynamic_index_in_dim(L_stack, index, keepdims=False).astype(jnp.float32)
    R = jax.lax.dynamic_index_in_dim(R_stack, index, keepdims=False).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return gs_apply_transpose(W.astype(jnp.float32), L, R) * s.astype(jnp.float32)[:, None]


@jax.jit
def _fold_rows(W, L_stack, R_stack, index, s):
    """``diag(s) Q^T W`` in float32 for ``W`` ``[out, ...]``: ``(W^T Q)^T`` on the flattened weight."""
    L = jax.lax.dynamic_index_in_dim(L_stack, index, keepdims=False).astype(jnp.float32)
    R = jax.lax.dynamic_index_in_dim(R_stack, index, keepdims=False).astype(jnp.float32)
    flat = W.astype(jnp.float32).reshape(W.shape[0], -1)
    with jax.default_matmul_precision("highest"):
        rows = gs_apply_transpose(flat.T, L, R).T
    return (rows * s.astype(jnp.float32)[:, None]).reshape(W.shape)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the little-endian bytes of safetensors ``dtype`` (BF16 rounded to nearest even)."""
    if dtype == "BF16":
        import ml_dtypes  # a dependency of jax

        return np.ascontiguousarray(x.astype(ml_dtypes.bfloat16).view("<u2"))
    return np.ascontiguousarray(x.astype(_NUMPY[dtype]))


def _check_single_file(path: Path, out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """The single-file output: a new ``.safetensors`` beside (not inside) the folder, not an input."""
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"{path}: single-file output must end in .safetensors")
    parent = path.parent if str(path.parent) else Path(".")
    if out_dir.resolve() in (parent.resolve(), path.resolve()):
        raise AdapterFileError(f"{path}: single-file output inside the output folder {out_dir}")
    if not parent.is_dir():
        raise AdapterFileError(f"{path}: output directory {parent} does not exist")
    for inp in inputs:
        if path.resolve() == inp.resolve() or (path.exists() and os.path.samefile(path, inp)):
            raise AdapterFileError(
                f"{path}: output file is the input {inp}; refusing to overwrite an input"
            )
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise AdapterFileError(f"{path}: output file exists (pass --overwrite to replace it)")
    if not path.is_file() or path.is_symlink():
        raise AdapterFileError(f"{path}: output path exists and is not a file; not replacing it")


def _read_config(path: Path) -> dict:
    """The UNet's ``config.json`` as a dict (the original layout's block arithmetic reads it)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: cannot read the UNet config ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: the UNet config is not a JSON object")
    return config


def _reject_output_rotations(path: Path) -> None:
    """PEFT <= 0.13 OFT rotates a layer's OUTPUT features, which this fold does not express."""
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    try:
        with SafetensorsFile(file) as f:
            keys = list(f.entries)
    except AdapterFileError:
        return  # load_adapter reports it
    if is_peft_keys(keys) and not any(k.endswith((".oft_R.weight", ".oft_s")) for k in keys):
        raise AdapterFileError(
            f"{file}: key {next(k for k in keys if k.endswith('.oft_r'))!r}: a PEFT <= 0.13 OFT "
            "adapter rotates the layer's output features; bake folds input rotations only"
        )


def bake_unet(
    model_dir: str | os.PathLike,
    adapter: GSAdapter | str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    *,
    overwrite: bool = False,
    single_file: str | os.PathLike | None = None,
) -> BakeResult:
    """Write a diffusers UNet folder ``out_dir`` whose torch weights have ``adapter`` folded in.

    Args:
      model_dir: a local diffusers model folder with ``unet/``, or a UNet folder (``config.json``
        and ``diffusion_pytorch_model.safetensors``, its shards, or the ``fp16`` variant).
      adapter: a :class:`GSAdapter`, or a path :func:`~orthofuse_jax.fusion.load_adapter` reads
        (reference GS file, PEFT OFT file or folder). Layers are matched by :func:`weight_key`.
      out_dir: the folder to create; it must not exist unless ``overwrite`` (then it is replaced
        only if it holds nothing but a config and ``diffusion_pytorch_model*`` files).
      dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for every weight; ``None`` keeps each tensor's dtype.
      overwrite: replace an existing ``out_dir`` (and ``single_file``).
      single_file: also write the same tensors as one ``.safetensors`` file in the original SDXL
        key layout (``model.diffusion_model.*``, :func:`~.single_file.original_unet_keys`): the UNet
        only, no VAE or text encoders. Needs diffusers and torch for diffusers' key conversion.
    Returns:
      a :class:`BakeResult`.
    Raises:
      AdapterFileError, MissingModelFileError, ValueError: one line naming the file and the key
      (an adapter layer that matches no weight, a shape mismatch, a missing folder or config, an
      unknown dtype, an existing output); nothing is written then.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    model_dir = Path(model_dir)
    folder = unet_folder(model_dir)
    config = folder / CONFIG_NAME
    files = [Path(p) for p in weight_files(os.fspath(folder))]
    out = Path(out_dir)
    check_output_folder(
        out,
        [model_dir, folder],
        overwrite=overwrite,
        replaceable=(CONFIG_NAME, "diffusion_pytorch_model*"),
    )
    single_path = None if single_file is None else Path(single_file)
    if single_path is not None:
        inputs = files if isinstance(adapter, GSAdapter) else [*files, Path(adapter)]
        _check_single_file(single_path, out, inputs, overwrite)

    source = "<adapter>"
    if not isinstance(adapter, GSAdapter):
        source = os.fspath(adapter)
        _reject_output_rotations(Path(adapter))
        adapter = load_adapter(adapter)
    orth = to_orthogonal(adapter)

    opened: list[SafetensorsFile] = []
    try:
        where: dict[str, SafetensorsFile] = {}
        for path in files:
            f = SafetensorsFile(path)
            opened.append(f)
            for key in f.entries:
                if key in where:
                    raise AdapterFileError(f"{path}: key {key!r}: also in {where[key].path}")
                where[key] = f
        plan = _plan(orth, where, source, files)
        layout = {}
        for key, f in where.items():
            stored, shape, _ = f.entries[key]
            layout[key] = (DTYPES[dtype] if dtype else stored, shape)
        stray = sorted(set(orth.scales) - set(orth.layer_names))
        if stray:
            raise AdapterFileError(f"{source}: adapter scale {stray[0]!r} has no GS layer")
        single = None
        if single_path is not None:
            names = original_unet_keys(_read_config(config), layout, os.fspath(config))
            single = (single_path, names)
        _write_outputs(out, config, where, layout, plan, orth, overwrite, source, single)
    finally:
        for f in opened:
            f.close()
    counts: dict[str, int] = {}
    for d, _ in layout.values():
        counts[d] = counts.get(d, 0) + 1
    return BakeResult(out, folder, len(plan), len(layout), counts, single_path)


def _plan(orth: GSAdapter, where: Mapping[str, SafetensorsFile], source: str, files) -> dict:
    """``{weight key: _Fold}`` (and scaled bias keys), checked before anything is written."""
    layers = {
        name: (key, i, stack)
        for key, stack in orth.stacks.items()
        for i, name in enumerate(stack.names)
    }
    plan: dict[str, _Fold] = {}
    output = orth.side == "output"
    flat: dict[str, list[str]] = {}
    if output:
        for key in where:
            if key.endswith(".weight"):
                flat.setdefault(key.removesuffix(".weight").replace(".", "_"), []).append(key)
    for name in sorted(layers):
        skey, i, stack = layers[name]
        wkey = weight_key(name)
        if wkey not in where and name.startswith("unet."):
            wkey = weight_key(name.removeprefix("unet."))
        if wkey not in where and len(flat.get(name.replace(".", "_"), [])) == 1:
            wkey = flat[name.replace(".", "_")][0]
        if wkey not in where:
            names = ", ".join(str(p) for p in files)
            raise AdapterFileError(
                f"{source}: adapter layer {name!r} matches no UNet weight (no key {wkey!r} in {names})"
            )
        f = where[wkey]
        shape = f.entries[wkey][1]
        n = stack.nb * stack.b
        if output and (len(shape) < 2 or shape[0] != n):
            raise AdapterFileError(
                f"{f.path}: key {wkey!r}: weight shape {list(shape)} [out, ...] does not fit "
                f"output-side adapter layer {name!r} of {source} (GS size n = {stack.nb} x {stack.b} "
                f"= {n}, shape {[stack.nb, stack.b, stack.b]})"
            )
        if not output and (len(shape) != 2 or shape[1] != n):
            raise AdapterFileError(
                f"{f.path}: key {wkey!r}: weight shape {list(shape)} [out, in] does not fit adapter "
                f"layer {name!r} of {source} (GS size n = {stack.nb} x {stack.b} = {n}, shape "
                f"{[stack.nb, stack.b, stack.b]})"
            )
        s = orth.scales.get(name)
        if s is not None and tuple(np.shape(s)) != (shape[0],):
            raise AdapterFileError(
                f"{f.path}: key {wkey!r}: weight shape {list(shape)} [out, in], but adapter layer "
                f"{name!r} of {source} has a scale of shape {list(np.shape(s))}"
            )
        if wkey in plan:
            raise AdapterFileError(
                f"{source}: adapter layers {plan[wkey].layer!r} and {name!r} both rotate {wkey!r}"
            )
        bias = None
        last = name.rpartition(".")[2]
        if s is not None and not output and last in ("to_q_moft", "to_k_moft", "to_v_moft"):
            bkey = wkey.removesuffix(".weight") + ".bias"
            if bkey in where:
                if where[bkey].entries[bkey][1] != (shape[0],):
                    raise AdapterFileError(
                        f"{where[bkey].path}: key {bkey!r}: bias shape {list(where[bkey].entries[bkey][1])}, "
                        f"expected {[shape[0]]}"
                    )
                bias = bkey
        plan[wkey] = _Fold(name, skey, i, s is not None, bias, output)
    return plan


def _tensor_bytes(where, layout, plan, orth):
    """Each output tensor's bytes in ``layout`` order: the stored bytes when unchanged, else read,
    folded (or its bias scaled) in float32 and cast once; one tensor in memory at a time."""
    biases = {p.bias_key: p for p in plan.values() if p.bias_key}
    for key, (dt, shape) in layout.items():
        f = where[key]
        stored = f.entries[key][0]
        fold = plan.get(key) or biases.get(key)
        if fold is None and dt == stored:  # unchanged: the stored bytes, bit for bit
            raw = np.empty(shape, "<u2" if stored == "BF16" else _NUMPY[stored])
            f.read_into(key, raw)
            yield raw.data.cast("B")
            continue
        x = f.read(key)
        if fold is not None:
            s = orth.scales.get(fold.layer)
            if key in plan:
                stack = orth.stacks[fold.stack]
                ones = jnp.ones((shape[0],), jnp.float32)
                s = ones if s is None else s
                fn = _fold_rows if fold.output else _fold_weight
                x = np.asarray(fn(x, stack.L, stack.R, np.int32(fold.index), s))
            else:
                x = x.astype(np.float32) * np.asarray(s, np.float32)
        data = _encode(x, dt)
        if not _finite(data, dt):
            raise AdapterFileError(
                f"{f.path}: key {key!r}: non-finite values after "
                f"{'folding and ' if fold is not None else ''}conversion to {dt}; nothing written"
            )
        yield data.data.cast("B")


def _write_outputs(out, config, where, layout, plan, orth, overwrite, source, single) -> None:
    """Stream every tensor once into the folder's weights and, with ``single = (path, {key: original
    key})``, into the single file too; both are written under temporary names and renamed."""
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    tmp_single = None
    meta = {"orthofuse_jax_adapter": os.path.basename(source)}
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        shutil.copyfile(config, tmp / CONFIG_NAME)
        targets = [(tmp / WEIGHTS_NAME, header_bytes(layout, meta))]
        if single is not None:
            path, names = single
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_single = Path(name)
            os.chmod(tmp_single, 0o666 & ~_umask())
            renamed = {names[k]: v for k, v in layout.items()}
            targets.append((tmp_single, header_bytes(renamed, meta)))
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(p, "wb")) for p, _ in targets]
            for w, (_, head) in zip(files, targets):
                w.write(head)
            for data in _tensor_bytes(where, layout, plan, orth):
                for w in files:
                    w.write(data)
            for w in files:
                w.flush()
                os.fsync(w.fileno())
        fsync_dir(tmp)
        install_folder(tmp, out, overwrite)
        if tmp_single is not None:
            os.replace(tmp_single, single[0])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp_single is not None:
            tmp_single.unlink(missing_ok=True)
        raise
    fsync_dir(parent)
    if single is not None:
        fsync_dir(single[0].parent)


def _finite(data: np.ndarray, dt: str) -> bool:
    if dt == "BF16":
        return bool(((data & 0x7F80) != 0x7F80).all())
    return bool(np.isfinite(data).all())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
