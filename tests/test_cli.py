"""The ``orthofuse-jax`` command line: happy paths and every bad input (exit 2, one line, no output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orthofuse_jax.cli import build_parser, main, parse_ts

PROC = "mid_block.attentions.0.transformer_blocks.0.attn{}.processor"
SHAPES = {PROC.format(1) + ".to_q_moft": (2, 3), PROC.format(2) + ".to_k_moft": (1, 4)}


def _skew(rng, shape, scale=0.3):
    g = rng.standard_normal(shape) * scale
    return (0.5 * (g - np.swapaxes(g, -1, -2))).astype(np.float32)


def tensors(seed, shapes=SHAPES, scale=0.3):
    rng = np.random.default_rng(seed)
    t = {}
    for name, (nb, b) in shapes.items():
        t[name + ".ort_monarch.L"] = _skew(rng, (nb, b, b), scale)
        t[name + ".ort_monarch.R"] = _skew(rng, (nb, b, b), scale)
    t[PROC.format(1) + ".q_scale"] = (1 + 0.1 * rng.standard_normal(6)).astype(np.float32)
    return t


def write(path, t):
    from safetensors.numpy import save_file

    save_file(t, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture()
def pair(tmp_path):
    return write(tmp_path / "concept.safetensors", tensors(0)), write(
        tmp_path / "style.safetensors", tensors(1)
    )


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_bad(capsys, argv, *needles, absent=()):
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for n in needles:
        assert str(n) in errors[0], errors[0]
    for p in absent:
        assert not Path(p).exists(), p
    return errors[0]


def _cay(a):
    s = 0.5 * (a - a.T)
    i = np.eye(len(a))
    return np.linalg.solve(i - s, i + s)


# ------------------------------------------------------------------------------------------------ happy paths


def test_fuse_default_preset_matches_scipy(capsys, pair, tmp_path):
    import scipy.linalg as sla

    from orthofuse_jax.fusion.io import read_tensors

    out = tmp_path / "fused.safetensors"
    rc, stdout, err = run(capsys, "fuse", *pair, "-o", out)
    assert rc == 0, err
    assert "fused 2 layers" in stdout and "max orthogonality error" in stdout and str(out) in stdout
    got, meta = read_tensors(out)
    assert (
        meta["format"] == "pt"
        and meta["orthofuse_method"] == "geodesic"
        and meta["orthofuse_restore"] == "cayley"
    )
    c, s = tensors(0), tensors(1)
    t = 0.6
    eta = 0.5 + 2 * t * (1 - t)
    for key in c:
        if ".ort_monarch." not in key:
            np.testing.assert_array_equal(
                got[key], c[key]
            )  # scales: concept rule (the reference's)
            continue
        for j in range(c[key].shape[0]):
            u1, u2 = _cay(c[key][j].astype(np.float64)), _cay(s[key][j].astype(np.float64))
            y = u1 @ np.real(sla.expm(t * sla.logm(u1.T @ u2)))
            y = _cay(eta * y)
            np.testing.assert_allclose(_cay(got[key][j].astype(np.float64)), y, atol=5e-6)


def test_fuse_algorithms_agree(capsys, pair, tmp_path):
    from orthofuse_jax.fusion.io import read_tensors

    outs = {}
    for algorithm in ("eigh", "matmul"):
        outs[algorithm] = tmp_path / f"{algorithm}.safetensors"
        rc, _, err = run(
            capsys,
            "fuse",
            *pair,
            "-o",
            outs[algorithm],
            "--restore",
            "exact",
            "--algorithm",
            algorithm,
        )
        assert rc == 0, err
    (a, _), (b, _) = read_tensors(outs["eigh"]), read_tensors(outs["matmul"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5, err_msg=key)
    with pytest.raises(SystemExit) as exc:  # argparse rejects the choice
        run(capsys, "fuse", *pair, "-o", tmp_path / "x.safetensors", "--algorithm", "qr")
    assert exc.value.code == 2 and "--algorithm" in capsys.readouterr().err


def test_fuse_cayley_exact_and_extrapolate(capsys, pair, tmp_path):
    out = tmp_path / "f.safetensors"
    rc, stdout, err = run(
        capsys,
        "fuse",
        *pair,
        "-o",
        out,
        "--method",
        "cayley",
        "--restore",
        "exact",
        "--t",
        "1.2",
        "--extrapolate",
        "--scales",
        "geometric",
    )
    assert rc == 0, err
    assert out.exists()


def test_sweep_writes_json_and_pngs(capsys, pair, tmp_path):
    d = tmp_path / "sw"
    rc, stdout, err = run(capsys, "sweep", *pair, "--ts", "0:1:3", "--plot", d)
    assert rc == 0, err
    st = json.loads((d / "sweep.json").read_text())
    assert st["ts"] == [0.0, 0.5, 1.0]
    for k in (
        "speed_before",
        "speed_after",
        "ambient_distance_after",
        "angle_hist_after",
        "orthogonality_error_after",
    ):
        assert len(st[k]) == 3
    assert {p.name for p in d.iterdir()} == {
        "sweep.json",
        "angles.png",
        "speed.png",
        "ambient_distance.png",
        "summary.png",
    }
    assert "geodesic distance" in stdout


def test_inspect_reports_layers_and_max_angle(capsys, pair):
    rc, stdout, err = run(capsys, "inspect", pair[0])
    assert rc == 0, err
    assert "2 GS layers" in stdout and "[2, 3, 3]" in stdout and "[1, 4, 4]" in stdout
    c = tensors(0)
    worst = max(
        float(np.max(np.abs(np.angle(np.linalg.eigvals(_cay(blk.astype(np.float64)))))))
        for k, v in c.items()
        if ".ort_monarch." in k
        for blk in v
    )
    assert f"max rotation angle overall: {worst:.3f} rad" in stdout
    # the fixture stores only q_scale: the k layer has no scale vector, which is reported
    assert "problems: 1" in stdout and "without a scale vector" in stdout


def test_inspect_lists_non_skew_problem(capsys, tmp_path):
    t = tensors(0)
    k = PROC.format(1) + ".to_q_moft.ort_monarch.L"
    t[k] = t[k] + np.float32(0.5)
    p = write(tmp_path / "ns.safetensors", t)
    rc, stdout, err = run(capsys, "inspect", p)
    assert rc == 0
    assert "problems: 2" in stdout and k in stdout
    assert "warning:" in err and k in err


def test_parse_ts():
    assert parse_ts("0:1:5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_ts("0.2,0.4") == [0.2, 0.4]
    assert parse_ts("0.3:0.3:1") == [0.3]


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    out = capsys.readouterr().out
    assert "geodesic" in out and "curve_over_id" in out and "0.6" in out


def test_startup_imports_no_flax_or_diffusers():
    code = (
        "import sys; from orthofuse_jax import cli; cli.build_parser(); "
        "bad = [m for m in ('flax', 'diffusers', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )


def test_version_names_the_kernels_build(capsys, monkeypatch):
    from importlib.metadata import version

    from orthofuse_jax import _native

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(
        f"orthofuse-jax {version('orthofuse-jax')} (jax {version('jax')}"
    )
    built = _native.library_path() is not None
    assert (f"the {_native.isa()} build" in out) == (built and _native.vectors_native())
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert ("switched off" in capsys.readouterr().out) == built
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    monkeypatch.setattr(_native, "isa", lambda: None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert ("no build for this CPU (x86-64 without AVX2" in capsys.readouterr().out) == built
    monkeypatch.setattr(_native, "isa", lambda: "portable")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert (
        "the portable build, used only with ORTHOFUSE_JAX_NATIVE=force" in capsys.readouterr().out
    ) == built


def test_every_command_is_registered_without_importing_jax():
    code = (
        "import sys; from orthofuse_jax import cli; p = cli.build_parser(); "
        "names = set(p._subparsers._group_actions[0].choices); "
        "assert names == {'fuse', 'sweep', 'demo', 'inspect', 'generate', 'encode-prompt', 'train', 'bake'}, names; "
        "bad = [m for m in ('jax', 'flax', 'diffusers', 'torch', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )


def test_a_missing_extra_is_named(monkeypatch, capsys):
    from orthofuse_jax.cli import generate_commands

    def run_generate(args):
        raise ModuleNotFoundError("No module named 'flax'", name="flax")

    monkeypatch.setattr(generate_commands, "run_generate", run_generate)
    rc, _, err = run(capsys, "generate", "--model", "m", "--prompt", "p", "-o", "o.png")
    assert rc == 2 and err.count("\n") == 1, err
    assert (
        "orthofuse-jax generate: error: flax is not installed" in err
        and "orthofuse-jax[sdxl]" in err
    ), err


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_key(capsys, pair, tmp_path):
    t = tensors(1)
    k = PROC.format(2) + ".to_k_moft.ort_monarch.R"
    del t[k]
    bad = write(tmp_path / "bad.safetensors", t)
    out = tmp_path / "o.safetensors"
    assert_bad(capsys, ["fuse", pair[0], bad, "-o", out], bad, k, absent=[out])


def test_extra_key(capsys, pair, tmp_path):
    t = tensors(1)
    t[PROC.format(2) + ".v_scale"] = np.ones(4, np.float32)
    bad = write(tmp_path / "bad.safetensors", t)
    out = tmp_path / "o.safetensors"
    assert_bad(
        capsys, ["fuse", pair[0], bad, "-o", out], bad, PROC.format(2) + ".v_scale", absent=[out]
    )


def test_extra_layer_in_style(capsys, pair, tmp_path):
    shapes = dict(SHAPES)
    shapes[PROC.format(2) + ".to_v_moft"] = (1, 4)
    bad = write(tmp_path / "bad.safetensors", tensors(1, shapes))
    out = tmp_path / "o.safetensors"
    assert_bad(
        capsys, ["fuse", pair[0], bad, "-o", out], bad, PROC.format(2) + ".to_v_moft", absent=[out]
    )


def test_nb_mismatch(capsys, pair, tmp_path):
    shapes = dict(SHAPES)
    shapes[PROC.format(1) + ".to_q_moft"] = (3, 2)
    bad = write(tmp_path / "bad.safetensors", tensors(1, shapes))
    out = tmp_path / "o.safetensors"
    assert_bad(
        capsys, ["fuse", pair[0], bad, "-o", out], bad, PROC.format(1) + ".to_q_moft", absent=[out]
    )


def test_non_finite(capsys, pair, tmp_path):
    t = tensors(1)
    k = PROC.format(1) + ".to_q_moft.ort_monarch.L"
    t[k][0, 0, 1] = np.nan
    bad = write(tmp_path / "bad.safetensors", t)
    out = tmp_path / "o.safetensors"
    assert_bad(capsys, ["fuse", pair[0], bad, "-o", out], bad, k, "non-finite", absent=[out])


def test_non_skew_warns_but_fuses(capsys, pair, tmp_path):
    t = tensors(1)
    k = PROC.format(1) + ".to_q_moft.ort_monarch.R"
    t[k] = t[k] + np.float32(0.1) * np.eye(3, dtype=np.float32)
    ns = write(tmp_path / "ns.safetensors", t)
    out = tmp_path / "o.safetensors"
    rc, stdout, err = run(capsys, "fuse", pair[0], ns, "-o", out)
    assert rc == 0
    warn = [line for line in err.splitlines() if "warning:" in line]
    assert len(warn) == 1 and k in warn[0] and str(ns) in warn[0]
    assert out.exists()


def test_eigenvalue_minus_one_names_layer(capsys, tmp_path):
    # L block 0 of to_q: rotation by +pi/2 in the (0,1) plane vs -pi/2 -> relative rotation by pi
    c, s = tensors(0), tensors(1)
    k = PROC.format(1) + ".to_q_moft.ort_monarch.L"
    for t, sign in ((c, 1.0), (s, -1.0)):
        t[k][0] = 0.0
        t[k][0, 0, 1], t[k][0, 1, 0] = sign, -sign  # sigma = 1 -> theta = 2 arctan(1) = pi/2
    pc, ps = write(tmp_path / "c.safetensors", c), write(tmp_path / "s.safetensors", s)
    out = tmp_path / "o.safetensors"
    assert_bad(capsys, ["fuse", pc, ps, "-o", out], PROC.format(1) + ".to_q_moft", absent=[out])


@pytest.mark.parametrize("t", ["1.5", "-0.1", "nan"])
def test_t_outside_range(capsys, pair, tmp_path, t):
    out = tmp_path / "o.safetensors"
    line = assert_bad(capsys, ["fuse", *pair, "-o", out, "--t", t], absent=[out])
    assert "t=" in line


def test_sweep_t_outside_range(capsys, pair, tmp_path):
    d = tmp_path / "sw"
    assert_bad(capsys, ["sweep", *pair, "--ts", "0:2:3", "--plot", d], "outside", absent=[d])
    assert_bad(capsys, ["sweep", *pair, "--ts", "a:b", "--plot", d], "--ts", absent=[d])


@pytest.mark.parametrize("cut", [0, 7, 100, -3])
def test_truncated_file(capsys, pair, tmp_path, cut):
    raw = pair[1].read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(raw[:cut])
    out = tmp_path / "o.safetensors"
    assert_bad(capsys, ["fuse", pair[0], bad, "-o", out], bad, absent=[out])
    assert_bad(capsys, ["inspect", bad], bad)


def test_missing_input_file(capsys, pair, tmp_path):
    out = tmp_path / "o.safetensors"
    assert_bad(
        capsys,
        ["fuse", pair[0], tmp_path / "nope.safetensors", "-o", out],
        "nope.safetensors",
        absent=[out],
    )


def test_output_equal_to_input(capsys, pair, tmp_path):
    before = pair[0].read_bytes()
    assert_bad(capsys, ["fuse", *pair, "-o", pair[0]], pair[0], "input")
    link = tmp_path / "link.safetensors"
    os.symlink(pair[1], link)
    assert_bad(capsys, ["fuse", *pair, "-o", link], "input")
    assert pair[0].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "concept.safetensors",
        "link.safetensors",
        "style.safetensors",
    ]


@pytest.mark.slow
def test_demo_end_to_end(capsys, tmp_path):
    d = tmp_path / "demo"
    rc, stdout, err = run(capsys, "demo", "--out", d)
    assert rc == 0, err
    names = {p.name for p in d.iterdir()}
    assert {"concept.safetensors", "style.safetensors", "fused.safetensors", "sweep"} <= names
    st = json.loads((d / "sweep" / "sweep.json").read_text())
    assert st["layers"] == 16 and len(st["ts"]) == 11
    assert "fused 16 layers (block sizes 20/40/64)" in stdout


def _fuse_in_subprocess(pair, out, cache, xdg):
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("ORTHOFUSE_JAX_COMPILE_CACHE", None)
    if cache is not None:
        env["ORTHOFUSE_JAX_COMPILE_CACHE"] = str(cache)
    code = "import sys; from orthofuse_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "fuse", str(pair[0]), str(pair[1]), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr


def test_compile_cache_is_filled_once_then_reused(pair, tmp_path):
    from safetensors.numpy import load_file

    xdg = tmp_path / "xdg"
    cache = xdg / "orthofuse-jax" / "jax"  # the default folder
    _fuse_in_subprocess(pair, tmp_path / "a.safetensors", None, xdg)
    first = sorted(p.name for p in cache.iterdir())
    assert first, "the first run wrote no compiled kernels into the cache"
    _fuse_in_subprocess(pair, tmp_path / "b.safetensors", None, xdg)
    assert sorted(p.name for p in cache.iterdir()) == first, (
        "the second run compiled something again"
    )
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_compile_cache_folder_and_off(pair, tmp_path):
    xdg = tmp_path / "xdg"
    _fuse_in_subprocess(pair, tmp_path / "a.safetensors", "off", xdg)
    assert not xdg.exists()
    _fuse_in_subprocess(pair, tmp_path / "b.safetensors", tmp_path / "mine", xdg)
    assert not xdg.exists() and any((tmp_path / "mine").iterdir())


def _runtime_in_subprocess(code: str, **env_updates) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "ORTHOFUSE_JAX_KEEP_XLA_FLAGS")
    }
    env.update(env_updates)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_PREFER = (
    "import os; from orthofuse_jax import prefer_cublas_gemm; "
    "print(prefer_cublas_gemm(), repr(os.environ.get('XLA_FLAGS')))"
)


def test_prefer_cublas_gemm_adds_the_flag_once_and_respects_the_user():
    assert _runtime_in_subprocess(_PREFER) == "True '--xla_gpu_enable_triton_gemm=false'"
    # other flags are kept, the user's own triton choice wins, and the opt-out leaves XLA_FLAGS alone
    assert _runtime_in_subprocess(_PREFER, XLA_FLAGS="--xla_dump_to=/tmp/x") == (
        "True '--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false'"
    )
    assert _runtime_in_subprocess(_PREFER, XLA_FLAGS="--xla_gpu_enable_triton_gemm=true") == (
        "False '--xla_gpu_enable_triton_gemm=true'"
    )
    assert _runtime_in_subprocess(_PREFER, ORTHOFUSE_JAX_KEEP_XLA_FLAGS="1") == "False None"
    # once a backend runs, XLA has read its flags: nothing is changed
    late = (
        "import os, jax; jax.numpy.zeros(1).block_until_ready(); "
        "from orthofuse_jax import prefer_cublas_gemm; "
        "print(prefer_cublas_gemm(), repr(os.environ.get('XLA_FLAGS')))"
    )
    assert _runtime_in_subprocess(late) == "False None"


def test_cli_asks_for_cublas_gemm_before_it_runs_a_command(pair, tmp_path, monkeypatch):
    from orthofuse_jax import _runtime

    order = []
    monkeypatch.setattr(_runtime, "prefer_cublas_gemm", lambda: order.append("gemm flag"))
    monkeypatch.setattr(_runtime, "enable_compile_cache", lambda: order.append("cache"))
    real = build_parser

    def parser_with_spy():
        parser = real()
        fuse = parser._subparsers._group_actions[0].choices["fuse"]
        func = fuse.get_default("func")
        fuse.set_defaults(func=lambda args: order.append("command") or func(args))
        return parser

    monkeypatch.setattr("orthofuse_jax.cli.build_parser", parser_with_spy)
    assert main(["fuse", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "o.safetensors")]) == 0
    assert order == ["gemm flag", "cache", "command"]
    # only the merge commands ask for it (it was measured on merges, not on the UNet commands)
    order.clear()
    assert main(["inspect", str(pair[0])]) == 0
    assert order == ["cache"]


def test_prefer_cublas_gemm_too_late_warns_only_on_a_gpu(monkeypatch, recwarn):
    import jax

    import orthofuse_jax

    jax.numpy.zeros(1).block_until_ready()  # the backend runs: XLA has read its flags
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("ORTHOFUSE_JAX_KEEP_XLA_FLAGS", raising=False)
    assert orthofuse_jax.prefer_cublas_gemm() is False and "XLA_FLAGS" not in os.environ
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(
        RuntimeWarning, match="after JAX's GPU backend started.*xla_gpu_enable_triton_gemm=false"
    ):
        assert orthofuse_jax.prefer_cublas_gemm() is False
    assert "XLA_FLAGS" not in os.environ


def test_sdxl_commands_share_the_model_option(capsys):
    """bake, generate, encode-prompt and train declare --model through one helper."""
    for command in ("bake", "generate", "encode-prompt", "train"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command])
        assert e.value.code == 2 and "--model" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "--model MODEL" in out and "local diffusers SDXL folder (" in out, command
        assert ("--hub-id" in out) == (command == "generate"), command


def test_a_missing_torch_names_the_interop_extra(monkeypatch, capsys):
    from orthofuse_jax.cli import bake_command

    def run_bake(args):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(bake_command, "run_bake", run_bake)
    rc, _, err = run(capsys, "bake", "--model", "m", "--adapter", "a", "-o", "o")
    assert rc == 2 and err.count("\n") == 1, err
    assert "torch is not installed" in err and "orthofuse-jax[interop]" in err, err
