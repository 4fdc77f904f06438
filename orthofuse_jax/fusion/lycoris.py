"""Read and write LyCORIS ``diag-oft`` and kohya sd-scripts OFT files as output-side GS adapters.

Both formats store, per adapted layer, ``<lora name>.oft_blocks`` ``[k, b, b]`` and ``<lora
name>.alpha`` (a norm constraint), LyCORIS optionally ``<lora name>.rescale`` ``[out, 1, ...]``.
With ``q = oft_blocks - oft_blocks^T`` (checked against both packages' source):

* LyCORIS (``modules/diag_oft.py``): when ``alpha > 0`` and ``|q|_F + 1e-8 > c = alpha * out``,
  ``q`` is scaled to ``c q / (|q|_F + 1e-8)``; ``alpha = 0`` means no constraint.
* kohya (``networks/oft.py``): always ``q (min(|q|_F, c) + 1e-8) / (|q|_F + 1e-8)``.

The rotation is ``R = Cay(q) = (I + q)(I - q)^{-1}`` per block, applied to the layer's OUTPUT
features by ``einsum("k n m, k n ... -> k m ...", R, W)``: ``W_block <- R^T W_block`` (conv weights
``[out, in, kh, kw]`` alike), then ``rescale * W``. As a GS adapter that is ``L = I`` (raw
parameters 0), ``R`` the raw Cayley parameters of the effective (constrained) ``q``, the rescale
as the scale vector and ``side="output"``: ``W_eff = diag(s) Q^T W`` with ``Q = BD(R)``.

Layer names are dotted torch module paths (``down_blocks.1.attentions.0.transformer_blocks.0.attn1
.to_q``). A file's lora name is the prefix (``lycoris``, ``lora_unet``, ``oft_unet``, ...) and the
path with dots replaced by ``_``, which is ambiguous; it is decoded against ``module_names`` when
given, else by a vocabulary of diffusers UNet module names. Names after the original SGM UNet
(``input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_...``, what kohya's SDXL scripts
write) are mapped to diffusers names as diffusers' own converter does (``layers_per_block`` 2, SDXL).

BOFT files (LyCORIS ``ButterflyOFT``, ``oft_blocks`` ``[m, block_num, b, b]``, ``m =``
:func:`boft_stages`) apply ``m`` stages to the rows: stage ``i`` interleaves the halves of each
group of ``2^i b`` rows, applies ``BD(Cay(q_i))`` as ``einsum("b i j, b j ... -> b i ...")``
(``r W``, not ``r^T W``), undoes the interleave; then ``rescale``; ``q`` constrained as above over
the whole tensor. Only ``block_num = 1`` (one stage, one block) is a GS matrix ``Q^T``: it is read
with ``L = I`` and ``R = -q[inv][:, inv]`` (``inv`` undoing the interleave), and written back as
BOFT when the template layer is BOFT. Over 2 or more blocks the first stage mixes contiguous
blocks and the second strided groups, the reverse of ``Q^T = BD(R)^T P^T BD(L)^T P``, and from 4
blocks on there are more than two block-diagonal factors: such files are refused with the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .._safetensors import is_lycoris_keys
from .adapter import GSAdapter, from_layers, to_cayley_params, to_orthogonal
from .io import AdapterFileError, check_output_path, read_tensors, save_tensors

__all__ = [
    "KOHYA_OFT",
    "LYCORIS_OFT",
    "boft_stages",
    "decode_module_name",
    "is_lycoris_oft",
    "load_lycoris_oft",
    "lycoris_format",
    "save_lycoris_oft",
    "sgm_to_diffusers",
]

LYCORIS_OFT = "lycoris-diag-oft"
"""Format name of LyCORIS ``diag-oft`` files."""
KOHYA_OFT = "kohya-oft"
"""Format name of kohya sd-scripts OFT files (lora names start with ``oft_unet_``)."""

_SUFFIXES = ("oft_blocks", "alpha", "rescale")
_PREFIXES = ("lycoris_", "lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "oft_unet_", "unet_")
# one component of a diffusers UNet module path that itself contains "_"
_COMPOUND = (
    "transformer_blocks",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_shortcut",
    "time_emb_proj",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    "add_k_proj",
    "add_v_proj",
)
_RESNET_SGM = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}


def is_lycoris_oft(tensors: Iterable[str]) -> bool:
    """Whether the keys of a ``{key: array}`` mapping (or the keys themselves) are a LyCORIS/kohya OFT file's."""
    return is_lycoris_keys(tensors)


def lycoris_format(tensors: Iterable[str]) -> str:
    """:data:`KOHYA_OFT` when every lora name starts with ``oft_unet_``, else :data:`LYCORIS_OFT`."""
    names = [k.split(".")[0] for k in tensors if k.endswith(".oft_blocks")]
    if not names:
        raise ValueError("no LyCORIS/kohya OFT keys (...oft_blocks)")
    return KOHYA_OFT if all(n.startswith("oft_unet_") for n in names) else LYCORIS_OFT


def _strip_prefix(lora_name: str) -> tuple[str, str]:
    for p in _PREFIXES:
        if lora_name.startswith(p):
            return p[:-1], lora_name[len(p) :]
    head, _, rest = lora_name.partition("_")
    return head, rest


def sgm_to_diffusers(flat: str, layers_per_block: int = 2) -> str:
    """An underscored SGM UNet path (``input_blocks_4_1_...``) as the underscored diffusers path."""
    m = re.match(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.*)$", flat) or re.match(
        r"(middle_block)_(\d+)_(.*)$", flat
    )
    if m is None:
        return flat
    if m.group(1) == "middle_block":
        i, rest = int(m.group(2)), m.group(3)
        head = "mid_block_attentions_0" if i == 1 else f"mid_block_resnets_{i // 2}"
        return f"{head}_{_resnet_rest(rest) if i != 1 else rest}"
    i, inner, rest = int(m.group(2)), int(m.group(3)), m.group(4)
    per = layers_per_block + 1
    if m.group(1) == "input_blocks":
        block, layer = (i - 1) // per, (i - 1) % per
        if rest.startswith("op"):
            return f"down_blocks_{block}_downsamplers_0_conv{rest[2:]}"
    else:
        block, layer = i // per, i % per
        if rest.startswith("conv"):
            return f"up_blocks_{block}_upsamplers_0_{rest}"
    kind = ("resnets", "attentions")[inner] if inner < 2 else "upsamplers"
    rest = _resnet_rest(rest) if kind == "resnets" else rest
    return (
        f"{'down' if m.group(1) == 'input_blocks' else 'up'}_blocks_{block}_{kind}_{layer}_{rest}"
    )


def _resnet_rest(rest: str) -> str:
    for sgm, diff in _RESNET_SGM.items():
        if rest == sgm or rest.startswith(sgm + "_"):
            return diff + rest[len(sgm) :]
    return rest


def decode_module_name(flat: str, module_names: Iterable[str] | None = None) -> str:
    """The dotted module path of an underscored one (lora name without its prefix).

    Decoded against ``module_names`` (dotted paths, e.g. a UNet's state-dict keys without
    ``.weight``) when one of them flattens to ``flat``; else by the vocabulary of diffusers names.
    SGM names are mapped to diffusers names first (:func:`sgm_to_diffusers`).
    """
    flat = sgm_to_diffusers(flat)
    if module_names is not None:
        found = {n for n in module_names if n.replace(".", "_") == flat}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise ValueError(f"module name {flat!r} is ambiguous: {sorted(found)}")
    parts, tokens = [], flat.split("_")
    i = 0
    while i < len(tokens):
        for size in (3, 2):
            cand = "_".join(tokens[i : i + size])
            if len(tokens[i : i + size]) == size and cand in _COMPOUND:
                parts.append(cand)
                i += size
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _effective_q(blocks: np.ndarray, alpha: float, kohya: bool) -> np.ndarray:
    """``q = blocks - blocks^T`` after the file's norm constraint, in float64."""
    q = blocks - np.swapaxes(blocks, -1, -2)
    c = alpha * blocks.shape[-3] * blocks.shape[-2]  # alpha times the output features
    norm = float(np.linalg.norm(q))
    if kohya:
        return q * ((min(norm, c) + 1e-8) / (norm + 1e-8))
    if c > 0 and norm + 1e-8 > c:
        return q * (c / (norm + 1e-8))
    return q


def boft_stages(block_num: int) -> int:
    """The butterfly stages LyCORIS's ``ButterflyOFT`` uses over ``block_num`` blocks.

    ``popcount(block_num - 1) + 1``; a file's ``oft_blocks`` ``[m, block_num, b, b]`` with
    ``m = 1`` is broadcast to that many stages when LyCORIS loads it.
    """
    return bin(block_num - 1).count("1") + 1


def _boft_q(where: str, blocks: np.ndarray, alpha: float) -> np.ndarray:
    """Raw Cayley parameters ``[1, b, b]`` of ``Q`` with ``Q^T`` a one-block BOFT file's rotation.

    The stage permutes rows within the block (``perm``), applies ``Cay(q)`` and permutes back:
    ``M = Cay(q)[inv][:, inv]``, so ``Q = M^T = Cay(-q[inv][:, inv])``.
    """
    m, num, b, b2 = blocks.shape
    if num < 1 or b != b2 or b % 2:
        raise AdapterFileError(
            f"{where}: shape {list(blocks.shape)} is not BOFT [m, block_num, b, b] with even b"
        )
    stages = boft_stages(num)
    if num > 1:
        raise AdapterFileError(f"{where}: {_not_gs(stages, num, b)}")
    if m != 1:
        raise AdapterFileError(
            f"{where}: shape {list(blocks.shape)}: {m} butterfly stages over one block; "
            "LyCORIS reads 1"
        )
    q = _effective_q(blocks, alpha, kohya=False)[0, 0]
    inv = np.argsort(np.arange(b).reshape(2, b // 2).T.reshape(-1))
    return -q[np.ix_(inv, inv)][None]


def _boft_blocks(path: Path, name: str, S: np.ndarray) -> np.ndarray:
    """One-block BOFT ``oft_blocks`` ``[1, 1, b, b]`` for raw parameters ``S`` ``[1, b, b]``: the
    inverse of :func:`_boft_q` (``q = -S[perm][:, perm]``, ``oft_blocks = q / 2``)."""
    if S.shape[0] != 1:
        raise AdapterFileError(
            f"{path}: layer {name!r}: {S.shape[0]} blocks; the template's BOFT layer holds one"
        )
    b = S.shape[-1]
    perm = np.arange(b).reshape(2, b // 2).T.reshape(-1)
    return (-S[0][np.ix_(perm, perm)] / 2)[None, None]


def _not_gs(stages: int, num: int, b: int) -> str:
    """Why a BOFT rotation over ``num > 1`` blocks of ``b`` is not an output-side GS matrix."""
    head = f"BOFT with m={stages} butterfly stages over {num} blocks of {b} is not a GS matrix"
    if stages > 2:
        return f"{head} (a GS matrix has two block-diagonal factors joined by one perfect shuffle)"
    return (
        f"{head} (its first stage mixes contiguous blocks, an output-side GS rotation Q^T first "
        "mixes strided groups; only one-block BOFT is read)"
    )


def load_lycoris_oft(
    path: str | os.PathLike,
    *,
    module_names: Iterable[str] | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> GSAdapter:
    """Read a LyCORIS ``diag-oft`` or kohya OFT safetensors file as an output-side GS adapter.

    Args:
      path: the ``.safetensors`` file (named in every error).
      module_names: dotted module paths to decode the lora names against (else the diffusers
        vocabulary, :func:`decode_module_name`).
      tensors: the file's ``{key: array}`` when already read.
    Returns:
      ``GSAdapter(orthogonal=False, side="output")`` float32: ``L = 0``, ``R`` the effective ``q``
      (module docstring), ``rescale`` as the scale vector.
    Raises:
      AdapterFileError: naming the file and key: BOFT over more than one block (not a GS
        matrix), bad shapes, non-finite values, a missing ``oft_blocks`` or ``alpha``, an
        unexpected key.
    """
    source = os.fspath(path)
    if tensors is None:
        tensors, _ = read_tensors(path)
    if not is_lycoris_oft(tensors):
        raise AdapterFileError(f"{source}: no LyCORIS/kohya OFT keys (...oft_blocks)")
    kohya = lycoris_format(tensors) == KOHYA_OFT
    names = list(module_names) if module_names is not None else None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(tensors):
        lora, _, suffix = key.partition(".")
        if suffix not in _SUFFIXES:
            raise AdapterFileError(f"{source}: key {key!r}: unexpected key for a LyCORIS OFT file")
        arr = np.asarray(tensors[key], dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise AdapterFileError(f"{source}: key {key!r}: non-finite values")
        groups.setdefault(lora, {})[suffix] = arr
    layers, scales = {}, {}
    for lora, parts in groups.items():
        for need in ("oft_blocks", "alpha"):
            if need not in parts:
                raise AdapterFileError(f"{source}: key {lora + '.' + need!r} is missing")
        blocks, key = parts["oft_blocks"], lora + ".oft_blocks"
        if parts["alpha"].size != 1:
            raise AdapterFileError(
                f"{source}: key {lora + '.alpha'!r}: shape {list(parts['alpha'].shape)} is not a scalar"
            )
        alpha = float(parts["alpha"].reshape(()))
        if blocks.ndim == 4:
            q = _boft_q(f"{source}: key {key!r}", blocks, alpha)
        elif blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2]:
            raise AdapterFileError(
                f"{source}: key {key!r}: shape {list(blocks.shape)} is not [k, b, b]"
            )
        else:
            q = _effective_q(blocks, alpha, kohya)
        try:
            name = decode_module_name(_strip_prefix(lora)[1], names)
        except ValueError as e:
            raise AdapterFileError(f"{source}: key {key!r}: {e}") from None
        layers[name] = (np.zeros(q.shape, np.float32), q.astype(np.float32))
        if "rescale" in parts:
            r = parts["rescale"]
            out = q.shape[0] * q.shape[1]
            if r.shape[:1] != (out,) or r.size != out:
                raise AdapterFileError(
                    f"{source}: key {lora + '.rescale'!r}: shape {list(r.shape)} is not [{out}, 1, ...]"
                )
            scales[name] = r.reshape(out).astype(np.float32)
    return from_layers(layers, scales, dtype=np.float32, side="output")


def save_lycoris_oft(
    path: str | os.PathLike,
    adapter: GSAdapter,
    *,
    template: str | os.PathLike | None = None,
    prefix: str = "lycoris",
    inputs: Iterable[str | os.PathLike] = (),
    identity_tol: float = 1e-5,
) -> Path:
    """Write an output-side adapter with ``L = I`` as a LyCORIS ``diag-oft`` (or kohya OFT) file.

    Layers whose template ``oft_blocks`` are BOFT (one block) are written as BOFT blocks.

    ``oft_blocks = S / 2`` for each layer's raw Cayley parameters ``S`` (so ``q = S``), ``alpha``
    0 (no constraint; for kohya files, whose constraint is always on, the smallest alpha that
    leaves every ``q`` unscaled), ``rescale`` from the scale vector when present.

    Args:
      path: the file to write (atomically; never one of ``inputs``).
      adapter: ``side="output"``, raw or orthogonal (a merge's result).
      template: a LyCORIS/kohya file whose lora names (prefix included) and rescale shapes are
        reused (e.g. one of the merged inputs); else ``prefix`` and rescale ``[out, 1]``.
      identity_tol: largest ``|L - I|`` (orthogonal) or ``|L|`` (raw) accepted.
    Raises:
      AdapterFileError: an input-side adapter, ``L`` not the identity, a layer missing from the
        template, non-finite values.
    """
    path = check_output_path(path, inputs)
    if adapter.side != "output":
        raise AdapterFileError(
            f"{path}: the adapter rotates the layers' {adapter.side} features; a LyCORIS OFT file "
            "rotates output features"
        )
    orth = to_orthogonal(adapter)
    raw = to_cayley_params(orth)
    names, shapes, kohya, boft = {}, {}, False, set()
    if template is not None:
        tt, _ = read_tensors(template)
        kohya = lycoris_format(tt) == KOHYA_OFT
        for key, arr in tt.items():
            lora, _, suffix = key.partition(".")
            flat = sgm_to_diffusers(_strip_prefix(lora)[1])
            names[flat] = lora
            if suffix == "rescale":
                shapes[lora] = np.shape(arr)
            if suffix == "oft_blocks" and np.ndim(arr) == 4:
                boft.add(lora)
    tensors: dict[str, np.ndarray] = {}
    alphas = []
    for stack_o, stack_r in zip(orth.stacks.values(), raw.stacks.values()):
        Lo, R = np.asarray(stack_o.L, np.float64), np.asarray(stack_r.R, np.float64)
        eye = np.eye(stack_o.b)
        for i, name in enumerate(stack_o.names):
            err = float(np.max(np.abs(Lo[i] - eye)))
            if not err <= identity_tol:
                raise AdapterFileError(
                    f"{path}: layer {name!r}: L differs from the identity by {err:.3g}; a diag-oft "
                    "file holds block-diagonal rotations only"
                )
            flat = name.replace(".", "_")
            if template is not None and flat not in names:
                raise AdapterFileError(f"{path}: layer {name!r} is not in the template {template}")
            lora = names.get(flat, f"{prefix}_{flat}")
            S = 0.5 * (R[i] - np.swapaxes(R[i], -1, -2))
            tensors[f"{lora}.oft_blocks"] = _boft_blocks(path, name, S) if lora in boft else S / 2
            alphas.append((lora, float(np.linalg.norm(S)) / (stack_o.nb * stack_o.b)))
            if name in adapter.scales:
                s = np.asarray(adapter.scales[name], np.float64)
                tensors[f"{lora}.rescale"] = s.reshape(shapes.get(lora, (s.shape[0], 1)))
    top = max((a for _, a in alphas), default=0.0) * (1 + 1e-6) + 1e-12 if kohya else 0.0
    for lora, _ in alphas:
        tensors[f"{lora}.alpha"] = np.asarray(top)
    for key, arr in tensors.items():
        if not np.all(np.isfinite(arr)):
            raise AdapterFileError(
                f"{path}: key {key!r}: non-finite values to be written; nothing written"
            )
    save_tensors(path, dict(sorted(tensors.items())))
    return path
