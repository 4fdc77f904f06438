"""Prompt encoding with the Flax CLIP text encoders vs diffusers' torch SDXL pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .conftest import TEXT_EMBED_DIM, TINY_UNET

pytest.importorskip("transformers")

PROMPT = "a photo of <sks> dog"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def torch_pipe(tiny_text_dir, torch_unet):
    """diffusers' torch StableDiffusionXLPipeline over the same tiny folder (the reference)."""
    pytest.importorskip("torch")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = tiny_text_dir
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        unet=torch_unet,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _torch_encode(pipe, prompt, negative=None):
    import torch

    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(
            prompt,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    return [x[0].numpy() for x in (pe, ne, pp, npool)]


def test_tokenizer_knows_the_prompt_words(tiny_text_dir):
    from orthofuse_jax.models._backbone import load_clip_tokenizer

    tok = load_clip_tokenizer(tiny_text_dir / "tokenizer_2")
    ids = tok(PROMPT, padding="max_length", max_length=77).input_ids
    # <|startoftext|> a photo of < sks > dog <|endoftext|>, then "!" padding (SDXL's tokenizer_2)
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:8] and ids[9:] == [tok.pad_token_id] * 68
    assert tok.convert_ids_to_tokens(ids[1:8]) == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "<</w>",
        "sks</w>",
        "></w>",
        "dog</w>",
    ]


def test_prompt_embeddings_match_diffusers_encode_prompt(tiny_text_dir, torch_pipe):
    from orthofuse_jax.models.text import load_text_encoders, prompt_embeddings

    enc = load_text_encoders(tiny_text_dir)
    ours = prompt_embeddings(enc, PROMPT)
    pe, ne, pp, npool = _torch_encode(torch_pipe, PROMPT)
    assert ours["prompt_embeds"].shape == (77, TINY_UNET["cross_attention_dim"])
    assert ours["pooled"].shape == (TEXT_EMBED_DIM,)
    assert _rel(ours["prompt_embeds"], pe) < 1e-5
    assert _rel(ours["pooled"], pp) < 1e-5
    # no negative prompt: SDXL base zeroes the negative embeddings, so none are returned (zeros used)
    assert "negative_prompt_embeds" not in ours and not ne.any() and not npool.any()

    ours = prompt_embeddings(enc, PROMPT, "watercolor style")
    pe, ne, pp, npool = _torch_encode(torch_pipe, PROMPT, "watercolor style")
    assert _rel(ours["negative_prompt_embeds"], ne) < 1e-5
    assert _rel(ours["negative_pooled"], npool) < 1e-5
    assert _rel(ours["prompt_embeds"], pe) < 1e-5  # batched with the negative, same result


def test_empty_negative_is_encoded_without_force_zeros(tiny_text_dir, torch_pipe):
    from orthofuse_jax.models.text import prompt_embeddings

    torch_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, ne, _, npool = _torch_encode(torch_pipe, PROMPT)
    finally:
        torch_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    ours = prompt_embeddings(tiny_text_dir, PROMPT, force_zeros=False)
    assert np.abs(ne).max() > 0.1
    assert (
        _rel(ours["negative_prompt_embeds"], ne) < 1e-5
        and _rel(ours["negative_pooled"], npool) < 1e-5
    )


def test_generate_from_prompt_matches_diffusers_pipeline(tiny_text_dir, torch_pipe):
    """Whole sampling path from text (encode, 3 Euler steps with CFG) vs StableDiffusionXLPipeline."""
    import torch

    from orthofuse_jax.models import generate

    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = torch_pipe(
            PROMPT,
            num_inference_steps=3,
            guidance_scale=5.0,
            height=64,
            width=64,
            latents=torch.from_numpy(noise),
            output_type="latent",
        ).images.numpy()
    _, ours = generate(
        tiny_text_dir,
        PROMPT,
        num_steps=3,
        guidance_scale=5.0,
        height=64,
        width=64,
        latents=noise,
        progress=False,
    )
    assert _rel(ours, ref) < 1e-4


def test_encode_prompt_then_generate_cli(tiny_text_dir, tmp_path, capsys):
    from PIL import Image

    from orthofuse_jax.cli import main
    from orthofuse_jax.models.generate import load_embeddings
    from orthofuse_jax.models.text import prompt_embeddings

    npz = tmp_path / "emb.npz"
    assert (
        main(
            [
                "encode-prompt",
                "--model",
                str(tiny_text_dir),
                "--prompt",
                PROMPT,
                "--negative-prompt",
                "",
                "-o",
                str(npz),
            ]
        )
        == 0
    )
    saved = load_embeddings(npz)
    direct = prompt_embeddings(tiny_text_dir, PROMPT, "")
    assert sorted(saved) == sorted(direct)
    for k in direct:
        np.testing.assert_array_equal(saved[k], direct[k])

    common = [
        "--model",
        str(tiny_text_dir),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--no-progress",
    ]
    a, b = tmp_path / "prompt.png", tmp_path / "emb.png"
    assert (
        main(["generate", *common, "--prompt", PROMPT, "--negative-prompt", "", "-o", str(a)]) == 0
    )
    assert main(["generate", *common, "--embeddings", str(npz), "-o", str(b)]) == 0
    img = Image.open(a)
    assert img.size == (64, 64) and img.text["prompt"] == PROMPT
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(b)))
    assert not list(tmp_path.glob(".*.tmp"))


def _copy_model(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("vae"))
    return dst


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: shutil.rmtree(root / "text_encoder_2"), "text_encoder_2"),
        (lambda root: (root / "tokenizer" / "vocab.json").unlink(), "vocab.json"),
        (lambda root: (root / "text_encoder" / "model.safetensors").unlink(), "model.safetensors"),
        (lambda root: (root / "text_encoder_2" / "config.json").unlink(), "config.json"),
    ],
    ids=["no-encoder-2", "no-vocab", "no-weights", "no-config"],
)
def test_missing_text_files_are_named(tiny_text_dir, tmp_path, capsys, damage, expected):
    from orthofuse_jax.cli import main

    root = _copy_model(tiny_text_dir, tmp_path / "model")
    damage(root)
    rc = main(
        [
            "generate",
            "--model",
            str(root),
            "--prompt",
            PROMPT,
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "-o",
            str(tmp_path / "x.png"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.npy").exists()


def test_non_finite_text_encoder_weight_is_named(tiny_text_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from orthofuse_jax.models.text import load_text_encoders

    root = _copy_model(tiny_text_dir, tmp_path / "model")
    path = root / "text_encoder" / "model.safetensors"
    w = load_file(path)
    key = next(k for k in sorted(w) if "mlp.fc1.weight" in k)
    w[key][0, 0] = np.nan
    save_file(w, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"text_encoder.*non-finite"):
        load_text_encoders(root)


def test_bad_prompt_arguments(tiny_text_dir, tmp_path, capsys):
    from orthofuse_jax.cli import main

    out = str(tmp_path / "x.png")
    base = ["generate", "--model", str(tiny_text_dir), "-o", out, "--steps", "1", "--no-progress"]
    assert main(base) == 2
    assert "--prompt" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_embeds=np.zeros((77, 2048), np.float32), pooled=np.zeros(1280, np.float32))
    assert main([*base, "--embeddings", str(bad), "--height", "64", "--width", "64"]) == 2
    err = capsys.readouterr().err
    assert "prompt_embeds" in err and "(77, 2048)" in err and "48" in err
    assert main([*base, "--embeddings", str(bad), "-o", str(bad)]) == 2  # output is an input
    assert bad.exists()


def test_train_encodes_the_prompt_like_encode_prompt(tiny_text_dir, tmp_path, capsys):
    """train --prompt feeds the text encoders' embeddings: same adapter as with encode-prompt's .npz."""
    from orthofuse_jax.cli import main
    from orthofuse_jax.fusion.io import load_adapter, read_tensors

    lat = tmp_path / "concept.npz"
    np.savez(lat, latents=np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    emb = tmp_path / "emb.npz"
    assert (
        main(["encode-prompt", "--model", str(tiny_text_dir), "--prompt", PROMPT, "-o", str(emb)])
        == 0
    )
    base = [
        "train",
        "--model",
        str(tiny_text_dir),
        "--latents",
        str(lat),
        "--resolution",
        "64",
        "--nblocks",
        "4",
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main([*base, "--prompt", PROMPT, "-o", str(a)]) == 0
    assert main([*base, "--prompt", PROMPT, "--embeddings", str(emb), "-o", str(b)]) == 0
    ta, meta = read_tensors(a)
    tb, _ = read_tensors(b)
    assert meta["prompt"] == PROMPT and sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])
    assert load_adapter(a).num_layers == 88

    capsys.readouterr()
    assert (
        main([*base, "-o", str(tmp_path / "c.safetensors")]) == 2
    )  # neither a prompt nor embeddings
    err = capsys.readouterr().err
    assert "--prompt" in err and "--embeddings" in err and not (tmp_path / "c.safetensors").exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, prompt_embeds=np.zeros((77, 2048), np.float32), pooled=np.zeros(1280, np.float32))
    assert main([*base, "--embeddings", str(bad), "-o", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "prompt_embeds" in err and "48" in err
