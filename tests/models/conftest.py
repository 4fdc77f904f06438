"""Tiny SDXL-shaped UNet (and VAE) built from configs with random weights, saved in diffusers format.

Shapes mirror SDXL where it matters for the adapters: cross-attention with a context width (48)
different from the hidden widths (32, 64) so the k/v adapters of attn2 are 'wide', text_time added
embeddings, attn1/attn2 at two resolutions, linear projections, transformer depth (1, 2).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("diffusers")

from orthofuse_jax.models.configs import TINY_SDXL_UNET as TINY_UNET
from orthofuse_jax.models.configs import pooled_dim

TEXT_EMBED_DIM = pooled_dim(TINY_UNET)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)


def _randomize(model, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5)
                + 0.01 * torch.randn(p.shape, generator=g)
            )
    return model


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    """Folder with config.json + diffusion_pytorch_model.safetensors of a random tiny UNet."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = _randomize(UNet2DConditionModel(**TINY_UNET), 0).eval()
    path = tmp_path_factory.mktemp("tiny_sdxl") / "unet"
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_unet_dir):
    """An SDXL-like model root: unet/ and vae/ (diffusers layout)."""
    pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    vae = _randomize(AutoencoderKL(**TINY_VAE), 1).eval()
    vae.save_pretrained(tiny_unet_dir.parent / "vae", safe_serialization=True)
    return tiny_unet_dir.parent


# Two tiny CLIP text encoders whose widths add up to the UNet's context width (16 + 32 = 48) and
# whose projection gives the pooled width (32), as SDXL's 768 + 1280 = 2048 and 1280.
TINY_CLIP = (
    dict(
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=2,
        hidden_act="quick_gelu",
    ),
    dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="gelu",
        projection_dim=TEXT_EMBED_DIM,
    ),
)
# CLIP's pre-tokenizer splits "<sks>" into "<", "sks", ">"; single characters are in the vocab anyway.
TINY_WORDS = ("a", "photo", "of", "sks", "dog", "in", "style", "watercolor")


def write_tiny_clip_tokenizer(folder, pad_token: str) -> dict:
    """A byte-level BPE CLIP tokenizer (vocab.json, merges.txt, configs) that knows TINY_WORDS whole."""
    import json

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    tok.save_pretrained(folder)
    return vocab


@pytest.fixture(scope="session")
def tiny_text_dir(tiny_model_dir):
    """A tiny model root with SDXL's text side: unet/, vae/, tokenizer{,_2}/, text_encoder{,_2}/ (random CLIP)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tiny_model_dir.parent / "tiny_sdxl_text"  # its own root: tiny_model_dir stays text-free
    root.mkdir()
    for part in ("unet", "vae"):
        (root / part).symlink_to(tiny_model_dir / part, target_is_directory=True)
    vocab = write_tiny_clip_tokenizer(root / "tokenizer", "<|endoftext|>")
    write_tiny_clip_tokenizer(root / "tokenizer_2", "!")  # SDXL's tokenizer_2 pads with "!"
    ids = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=1,
    )
    torch.manual_seed(1)
    for name, cls, cfg in (
        ("text_encoder", CLIPTextModel, TINY_CLIP[0]),
        ("text_encoder_2", CLIPTextModelWithProjection, TINY_CLIP[1]),
    ):
        model = cls(CLIPTextConfig(**cfg, **ids)).eval()
        model.save_pretrained(root / name, safe_serialization=True)
    return root


@pytest.fixture(scope="session")
def torch_unet(tiny_unet_dir):
    pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_unet_dir).eval()


@pytest.fixture(scope="session")
def flax_unet(tiny_unet_dir):
    """(module, params, config) loaded by our numpy converter."""
    from orthofuse_jax.models import load_unet

    return load_unet(tiny_unet_dir)


def random_inputs(seed: int = 0, batch: int = 2, tokens: int = 5, size: int = 8):
    rng = np.random.default_rng(seed)
    return dict(
        sample=rng.standard_normal((batch, 4, size, size)).astype(np.float32),
        timesteps=np.array([981.0, 421.0][:batch], dtype=np.float32),
        encoder_hidden_states=rng.standard_normal(
            (batch, tokens, TINY_UNET["cross_attention_dim"])
        ).astype(np.float32),
        text_embeds=rng.standard_normal((batch, TEXT_EMBED_DIM)).astype(np.float32),
        time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1)),
    )


def torch_forward(model, x) -> np.ndarray:
    """The torch UNet's output on :func:`random_inputs` ``x`` (float32 numpy)."""
    import torch

    with torch.no_grad():
        out = model(
            torch.tensor(x["sample"]),
            torch.tensor(x["timesteps"]),
            torch.tensor(x["encoder_hidden_states"]),
            added_cond_kwargs={
                "text_embeds": torch.tensor(x["text_embeds"]),
                "time_ids": torch.tensor(x["time_ids"]),
            },
        )
    return out.sample.float().numpy()


def random_adapter(
    table, *, nb: int = 4, seed: int = 0, angle: float = 0.3, dtype=np.float32, scales: bool = True
):
    """A raw-Cayley GS adapter over every layer of ``table`` (n = input width, scales = output width)."""
    from orthofuse_jax.fusion.adapter import from_layers

    rng = np.random.default_rng(seed)
    layers, sc = {}, {}
    for name, spec in table.items():
        b = spec.n_in // nb
        A = rng.standard_normal((2, nb, b, b)) * angle / np.sqrt(b)
        A = (A - np.swapaxes(A, -1, -2)) / 2
        layers[name] = (A[0].astype(dtype), A[1].astype(dtype))
        if scales:
            sc[name] = (1.0 + 0.2 * rng.standard_normal(spec.n_out)).astype(dtype)
    return from_layers(layers, sc, dtype=dtype)
