"""SDXL prompt encoding with the two Flax CLIP text encoders (docs/math.md §4).

SDXL conditions its UNet on two CLIP text encoders, as diffusers' ``StableDiffusionXLPipeline
.encode_prompt`` does it:

* each tokenizer pads the prompt to ``model_max_length`` (77) and truncates;
* ``prompt_embeds`` = the penultimate hidden states (``hidden_states[-2]``) of ``text_encoder``
  (CLIP ViT-L, 768) and ``text_encoder_2`` (OpenCLIP bigG, 1280), concatenated: ``[77, 2048]``;
* ``pooled`` = ``text_encoder_2``'s projected pooled output (``text_embeds``): ``[1280]``;
* the negative prompt: ``None`` gives zeros when the pipeline's ``force_zeros_for_empty_prompt``
  is set (SDXL base, the default when ``model_index.json`` says nothing), otherwise the encoding of
  ``""``; any given string, ``""`` included, is encoded.

The result is the mapping :func:`~orthofuse_jax.models.generate.load_embeddings` returns and
``generate --embeddings`` / :func:`save_embeddings` write, so text can be encoded once and reused.
The encoders run in float32 (the reference's setting) under one jitted call per encoder.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import numpy as np

__all__ = [
    "TextEncoders",
    "encode_prompt",
    "force_zeros_for_empty_prompt",
    "load_text_encoders",
    "prompt_embeddings",
    "save_embeddings",
]

ENCODER_FOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@dataclass
class TextEncoders:
    """The two SDXL tokenizers and Flax CLIP text encoders of a model folder, with their params."""

    tokenizers: tuple
    models: tuple
    params: tuple
    source: str = ""
    _apply: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        def run(model):
            def f(params, ids):
                out = model(ids, params=params, output_hidden_states=True)
                pooled = out["text_embeds"] if "text_embeds" in out else out["pooler_output"]
                return out["hidden_states"][-2], pooled

            return jax.jit(f)

        self._apply = [run(m) for m in self.models]


def _model_root(model: str | os.PathLike) -> str:
    from ._backbone import MissingModelFileError

    root = os.fspath(model)
    if not os.path.isdir(root):
        raise MissingModelFileError(f"model folder {root!r} does not exist")
    return root


def load_text_encoders(model: str | os.PathLike) -> TextEncoders:
    """Tokenizers and text encoders from ``model/{tokenizer,text_encoder}{,_2}`` (diffusers layout).

    Raises :class:`~orthofuse_jax.models.MissingModelFileError` naming a missing folder or file.
    """
    from . import _backbone

    root = _model_root(model)
    toks, mods, params = [], [], []
    for i, (tok_dir, enc_dir) in enumerate(ENCODER_FOLDERS):
        enc_path = os.path.join(root, enc_dir)
        if not os.path.isdir(enc_path):
            raise _backbone.MissingModelFileError(
                f"model folder {root!r} has no {enc_dir}/ (SDXL needs both CLIP text encoders to "
                "encode a prompt; pass precomputed --embeddings otherwise)"
            )
        toks.append(_backbone.load_clip_tokenizer(os.path.join(root, tok_dir)))
        m, p = _backbone.load_clip_text(enc_path, projection=i == 1)
        mods.append(m)
        params.append(p)
    return TextEncoders(tuple(toks), tuple(mods), tuple(params), source=root)


def force_zeros_for_empty_prompt(model: str | os.PathLike) -> bool:
    """The pipeline flag from ``model/model_index.json`` (True, SDXL base's value, when absent)."""
    path = os.path.join(os.fspath(model), "model_index.json")
    if not os.path.isfile(path):
        return True
    with open(path) as f:
        try:
            return bool(json.load(f).get("force_zeros_for_empty_prompt", True))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def encode_prompt(
    encoders: TextEncoders, prompt: str | Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_embeds [B, 77, D1 + D2], pooled [B, P])`` for one prompt or a list (B = 1 for a str)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    hidden, pooled = [], None
    for tok, apply, params in zip(encoders.tokenizers, encoders._apply, encoders.params):
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        h, p = apply(params, ids.astype(np.int32))
        hidden.append(np.asarray(h, np.float32))
        pooled = np.asarray(p, np.float32)  # the last encoder's (text_encoder_2) projection
    assert pooled is not None, "SDXL has two text encoders"
    return np.concatenate(hidden, axis=-1), pooled


def prompt_embeddings(
    model: str | os.PathLike | TextEncoders,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    force_zeros: bool | None = None,
) -> dict[str, np.ndarray]:
    """Embeddings of ``prompt`` (and its negative) as :func:`generate` takes them.

    Returns ``prompt_embeds [77, 2048]`` and ``pooled [1280]`` (SDXL sizes), plus
    ``negative_prompt_embeds`` / ``negative_pooled`` when the negative is encoded (a string was given,
    or ``force_zeros`` is False); otherwise the sampler uses zeros, as the SDXL pipeline does.
    ``force_zeros`` defaults to the model folder's ``force_zeros_for_empty_prompt``.
    """
    if isinstance(model, TextEncoders):
        enc = model
        if force_zeros is None:
            force_zeros = force_zeros_for_empty_prompt(enc.source) if enc.source else True
    else:
        root = _model_root(model)
        if force_zeros is None:
            force_zeros = force_zeros_for_empty_prompt(root)
        enc = load_text_encoders(root)
    encode_negative = negative_prompt is not None or not force_zeros
    batch = [prompt] + ([negative_prompt or ""] if encode_negative else [])
    embeds, pooled = encode_prompt(enc, batch)
    out = {"prompt_embeds": embeds[0], "pooled": pooled[0]}
    if encode_negative:
        out["negative_prompt_embeds"], out["negative_pooled"] = embeds[1], pooled[1]
    return out


def save_embeddings(
    path: str | os.PathLike, embeddings: dict[str, np.ndarray], *, prompt: str = ""
) -> None:
    """Write embeddings as ``.npz`` (atomically), readable by ``generate --embeddings`` and ``train``."""
    from ..fusion.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(
        buf,
        **{k: np.asarray(v, np.float32) for k, v in embeddings.items()},  # type: ignore[arg-type]
        prompt=np.asarray(prompt),
    )
    atomic_write_bytes(path, buf.getvalue())
