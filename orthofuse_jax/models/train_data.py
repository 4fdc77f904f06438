"""Training data for GS adapters: latents + text embeddings, from images or precomputed (docs/math.md §6).

Everything the training step sees is a :class:`LatentData`: VAE latents ``x_0`` (already times the
VAE scaling factor; optionally with the posterior std so every step draws a fresh
``mean + std * n`` like the reference's ``latent_dist.sample()``), one prompt embedding for the
whole set, and the original image sizes for SDXL's ``time_ids``.

* Concept (reference ``ImageDataset``): every image under a folder, centre-cropped to the short side
  and resized to ``resolution`` (Lanczos), ``[-1, 1]``; one image drawn uniformly per batch item.
* Style (reference ``StyleDataset``): one image resized so its short side is ``resolution``
  (bilinear, antialiased) and a random ``resolution`` crop per step. Here the whole resized image
  is encoded once and the crop is taken in latent space (offsets on the 8-pixel latent grid):
  an approximation of encoding each pixel crop (the VAE's receptive field sees beyond the crop
  border) that saves a VAE pass per step.
* ``time_ids = [orig_h, orig_w, 0, 0, target_h, target_w]``: crop corner (0, 0) as in the reference
  (docs/math.md §8); original size in SDXL's (h, w) order (the reference's style set writes (w, h)).

Prompt embeddings come from :mod:`orthofuse_jax.models.text` (the model's CLIP text encoders) or
from ``.npz`` files (``prompt_embeds [77, 2048]``, ``pooled [1280]``), the format of
``generate --embeddings`` and ``encode-prompt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "EmbeddingsRequiredError",
    "LatentData",
    "encode_images",
    "list_images",
    "load_latents",
    "load_prompt_embeddings",
    "preprocess_concept",
    "preprocess_style",
    "save_latents",
    "schedule_datasets",
    "style_caption",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EmbeddingsRequiredError(ValueError):
    """Neither a prompt to encode nor precomputed text embeddings were given."""


@dataclass
class LatentData:
    """A training set in latent space.

    Attributes:
      latents: ``[N, C, H, W]`` float32, ``x_0`` (or the posterior mean), scaled by the VAE factor.
      std: ``[N, C, H, W]`` scaled posterior std, or None (deterministic ``x_0``).
      prompt_embeds: ``[T, D]`` text embeddings shared by the set.
      pooled: ``[P]`` pooled text embedding.
      original_sizes: ``[N, 2]`` (h, w) of the source images in pixels.
      crop: latent ``(h, w)`` of one training sample (``H, W`` when not cropping).
      random_crop: draw a random crop (style) instead of the top-left/centre (concept: the
        latents already have the crop size).
      vae_scale_factor: pixels per latent cell (8 for SDXL), for the target size in ``time_ids``.
      name: label for messages.
    """

    latents: np.ndarray
    std: np.ndarray | None
    prompt_embeds: np.ndarray
    pooled: np.ndarray
    original_sizes: np.ndarray
    crop: tuple[int, int]
    random_crop: bool = False
    vae_scale_factor: int = 8
    name: str = "data"

    def __post_init__(self):
        lat = np.asarray(self.latents, np.float32)
        if lat.ndim != 4:
            raise ValueError(f"{self.name}: latents must be [N, C, H, W], got shape {lat.shape}")
        if self.std is not None and np.shape(self.std) != lat.shape:
            raise ValueError(
                f"{self.name}: latents_std has shape {np.shape(self.std)}, latents {lat.shape}"
            )
        h, w = self.crop
        if not (0 < h <= lat.shape[2] and 0 < w <= lat.shape[3]):
            raise ValueError(
                f"{self.name}: crop {self.crop} does not fit latents of size {lat.shape[2:]}"
            )
        pe = np.asarray(self.prompt_embeds, np.float32)
        if pe.ndim != 2:
            raise ValueError(f"{self.name}: prompt_embeds must be [T, D], got shape {pe.shape}")
        pooled = np.asarray(self.pooled, np.float32)
        if pooled.ndim != 1:
            raise ValueError(f"{self.name}: pooled must be [P], got shape {pooled.shape}")
        sizes = np.asarray(self.original_sizes, np.float32).reshape(-1, 2)
        if sizes.shape[0] != lat.shape[0]:
            raise ValueError(
                f"{self.name}: {sizes.shape[0]} original sizes for {lat.shape[0]} latents"
            )
        for arr, what in ((lat, "latents"), (pe, "prompt_embeds"), (pooled, "pooled")):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{self.name}: {what} has non-finite values")
        self.latents, self.prompt_embeds, self.pooled, self.original_sizes = lat, pe, pooled, sizes
        if self.std is not None:
            self.std = np.asarray(self.std, np.float32)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample(self, rng: np.random.Generator, batch_size: int = 1) -> dict[str, np.ndarray]:
        """A batch: items drawn uniformly with replacement, cropped, resampled from the posterior."""
        idx = rng.integers(0, len(self), size=batch_size)
        h, w = self.crop
        H, W = self.latents.shape[2:]
        out = []
        for i in idx:
            if self.random_crop:
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            else:
                top, left = (H - h) // 2, (W - w) // 2
            x = self.latents[i, :, top : top + h, left : left + w]
            if self.std is not None:
                x = x + self.std[i, :, top : top + h, left : left + w] * rng.standard_normal(
                    x.shape, dtype=np.float32
                )
            out.append(x)
        f = self.vae_scale_factor
        tids = np.concatenate(
            [
                self.original_sizes[idx],
                np.zeros((batch_size, 2), np.float32),
                np.tile([[h * f, w * f]], (batch_size, 1)),
            ],
            axis=1,
        ).astype(np.float32)
        return dict(
            latents=np.stack(out).astype(np.float32),
            prompt_embeds=np.broadcast_to(
                self.prompt_embeds, (batch_size, *self.prompt_embeds.shape)
            ).copy(),
            text_embeds=np.broadcast_to(self.pooled, (batch_size, *self.pooled.shape)).copy(),
            time_ids=tids,
        )


def schedule_datasets(count: int, steps: int, mix: Sequence[float] | None = None) -> np.ndarray:
    """Dataset index per step: a deterministic interleave with exact proportions ``mix``.

    Step ``i`` uses the dataset whose cumulative quota ``floor((i + 1) * p_k)`` grows first
    (largest remainder); two datasets with equal weights alternate 0, 1, 0, 1, ...
    """
    if count < 1:
        raise ValueError("no training data")
    p = np.full(count, 1.0 / count) if mix is None else np.asarray(mix, np.float64)
    if p.shape != (count,) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(
            f"mix {list(np.atleast_1d(p))} must be {count} non-negative weights summing to 1"
        )
    used = np.zeros(count)
    order = np.empty(steps, np.int64)
    for i in range(steps):
        k = int(np.argmax((i + 1) * p - used))
        order[i] = k
        used[k] += 1
    return order


def load_latents(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a latents ``.npz``: ``latents [N, C, H, W]`` (scaled ``x_0``; ``[C, H, W]`` for one),
    optional ``latents_std`` (same shape) and ``original_sizes [N, 2]`` ((h, w) in pixels)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latents file {path!r} does not exist")
    with np.load(path) as f:
        data = {k: np.asarray(f[k]) for k in f.files}
    if "latents" not in data:
        raise ValueError(f"{path}: missing array 'latents' (found {sorted(data)})")
    for k in ("latents", "latents_std"):
        if k in data and data[k].ndim == 3:
            data[k] = data[k][None]
        if k in data and data[k].ndim != 4:
            raise ValueError(f"{path}: {k!r} has shape {data[k].shape}, expected [N, C, H, W]")
    return data


def save_latents(path: str | os.PathLike, latents, std=None, original_sizes=None) -> None:
    """Write the ``.npz`` read by :func:`load_latents` (atomically)."""
    import io

    from ..fusion.io import atomic_write_bytes

    path = os.fspath(path)
    arrays = {"latents": np.asarray(latents, np.float32)}
    if std is not None:
        arrays["latents_std"] = np.asarray(std, np.float32)
    if original_sizes is not None:
        arrays["original_sizes"] = np.asarray(original_sizes, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())


def load_prompt_embeddings(
    path: str | os.PathLike | None, prompt: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_embeds [T, D], pooled [P])`` from an embeddings ``.npz`` (``generate`` format).

    Raises :class:`EmbeddingsRequiredError` when ``path`` is None (encode ``prompt`` with
    :func:`orthofuse_jax.models.text.prompt_embeddings` instead).
    """
    if path is None:
        raise EmbeddingsRequiredError(
            f"no text embeddings file for the prompt {prompt!r}: pass --embeddings FILE.npz with prompt_embeds "
            "[77, 2048] (penultimate hidden states of both encoders, concatenated) and pooled [1280], or "
            "encode the prompt with the model's text encoders"
        )
    from .generate import load_embeddings

    emb = load_embeddings(path)
    return emb["prompt_embeds"], emb["pooled"]


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder`` (recursively, sorted), as the reference's ``os.walk``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return sorted(found)


def _to_unit(img) -> np.ndarray:
    arr = np.asarray(img.convert("RGB"), np.float32) / 255.0
    return (arr * 2.0 - 1.0).transpose(2, 0, 1)  # [3, H, W] in [-1, 1]


def preprocess_concept(path: str, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre crop to the short side, Lanczos resize to ``resolution``, ``[-1, 1]`` (docs/math.md §6)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = (
            im.convert("RGB")
            .crop((left, top, left + s, top + s))
            .resize((resolution, resolution), Image.Resampling.LANCZOS)
        )
        return _to_unit(square), (h, w)


def preprocess_style(
    path: str, resolution: int, multiple: int = 8
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize so the short side is ``resolution`` (bilinear, antialiased), sides rounded down to
    ``multiple`` pixels so the latent grid is whole; ``[-1, 1]`` (docs/math.md §6, before the random crop)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        nw, nh = nw - nw % multiple, nh - nh % multiple
        scaled = im.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        return _to_unit(scaled), (h, w)


def encode_images(
    vae, vae_params, images: Sequence[np.ndarray], *, scaling_factor: float | None = None
):
    """VAE posterior ``(mean, std)`` of each ``[3, H, W]`` image, times the scaling factor (NCHW)."""
    import jax
    import jax.numpy as jnp

    sf = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)

    @jax.jit
    def enc(p, x):
        dist = vae.apply({"params": p}, x, method=vae.encode).latent_dist
        return dist.mean.transpose(0, 3, 1, 2) * sf, dist.std.transpose(0, 3, 1, 2) * sf

    means, stds = [], []
    for img in images:
        m, s = enc(vae_params, jnp.asarray(img[None], vae.dtype))
        means.append(np.asarray(m, np.float32)[0])
        stds.append(np.asarray(s, np.float32)[0])
    return means, stds


def style_caption(
    image_path: str, caption_file: str | None = None, suffix: str = " in <style> style"
) -> str | None:
    """Reference style prompt ``data[file_name][0] + suffix`` from ``data.json`` next to the image.

    Returns None when there is no caption file (or no entry for the image).
    """
    path = caption_file or os.path.join(os.path.dirname(os.path.abspath(image_path)), "data.json")
    if not os.path.isfile(path):
        if caption_file:
            raise FileNotFoundError(f"caption file {caption_file!r} does not exist")
        return None
    with open(path) as f:
        data = json.load(f)
    entry = data.get(os.path.basename(image_path))
    if entry is None:
        return None
    text = entry[0] if isinstance(entry, list) else str(entry)
    return f"{text}{suffix}"
