"""Importing the package changes nothing in the process: no JAX backend, no environment, no config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, os, sys
import jax
from jax._src import xla_bridge
env = dict(os.environ)
config = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_compilation_cache_dir", "jax_platforms")}
before = set(sys.modules)
import orthofuse_jax, orthofuse_jax.geometry, orthofuse_jax.fusion, orthofuse_jax.models, orthofuse_jax.cli
print(json.dumps({
    "backend_started": xla_bridge.backends_are_initialized(),
    "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "config_changed": [k for k, v in config.items() if getattr(jax.config, k) != v],
    "new_modules": sorted({m.split(".")[0] for m in set(sys.modules) - before}),
}))
"""


def _probe(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_has_no_side_effects():
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    got = _probe(env)
    assert not got["backend_started"]
    assert got["env_changed"] == []  # PJRT_NPROC and XLA_FLAGS are for the command line to set
    assert got["config_changed"] == []
    # heavy optional parts load where they are used, not on import
    assert not {"matplotlib", "flax", "optax", "diffusers", "transformers", "torch", "PIL"} & set(
        got["new_modules"]
    )


def test_the_thread_workaround_is_applied_by_the_cli_and_named_to_library_users(tmp_path):
    code = (
        "import os, warnings, jax, orthofuse_jax; from orthofuse_jax import _runtime; "
        "jax.numpy.zeros(1).block_until_ready(); "
        "warnings.simplefilter('error'); "
        "needs = _runtime.jaxlib_needs_one_thread() and (os.cpu_count() or 1) > 1\n"
        "try:\n    _runtime.warn_cpu_threads(); print('quiet')\n"
        "except RuntimeWarning as e:\n    print('warned:', e)\n"
        "print('needs' if needs else 'fine')"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "ORTHOFUSE_JAX_KEEP_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    first, needs = out.stdout.strip().splitlines()
    if needs == "needs":
        assert (
            first.startswith("warned:")
            and "PJRT_NPROC=1" in first
            and "configure_cpu_threads()" in first
        )
    else:
        assert first == "quiet"
    env["PJRT_NPROC"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[0] == "quiet"
    # the command line sets it before JAX starts
    from safetensors.numpy import save_file

    a = np.zeros((2, 3, 3), np.float32)
    path = tmp_path / "a.safetensors"
    save_file(
        {"p.processor.to_q_moft.ort_monarch.L": a, "p.processor.to_q_moft.ort_monarch.R": a},
        str(path),
    )
    code = "import os, sys; from orthofuse_jax.cli import main; main(['inspect', sys.argv[1]]); print(os.environ.get('PJRT_NPROC'))"
    del env["PJRT_NPROC"]
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == ("1" if needs == "needs" else "None")
