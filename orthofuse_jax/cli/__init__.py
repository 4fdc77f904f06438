"""Command line: ``orthofuse-jax {fuse, sweep, demo, inspect, generate, encode-prompt, train, bake}``.

One module per command group (:mod:`.merge_commands`, :mod:`.generate_commands`,
:mod:`.train_command`, :mod:`.bake_command`), each with a ``register(subparsers)``; the library lives in
:mod:`orthofuse_jax.fusion` and :mod:`orthofuse_jax.models`. Building the parser imports
neither JAX nor Flax, so ``--help`` is quick; a command imports what it needs.

Every bad input (unreadable/truncated file, missing/extra keys, shape or block-count mismatch,
non-finite values, a merged block with an eigenvalue -1, t outside [0, 1] without
``--extrapolate``, output path equal to an input) ends with a one-line message on stderr,
``orthofuse-jax COMMAND: error: ...``, and exit status 2, and leaves no output file (writes
are atomic). That error path is :func:`main`'s, for every command.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import bake_command, generate_commands, merge_commands, train_command
from ._common import EXIT_BAD_INPUT, PROG, CLIError
from .merge_commands import parse_ts

__all__ = ["EXIT_BAD_INPUT", "CLIError", "build_parser", "main", "parse_ts", "version_text"]


def version_text() -> str:
    """The package's version, JAX's, and which build of the compiled CPU kernels runs here (for bug
    reports; imports no JAX)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__, _native

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    if _native.library_path() is None:
        kernels = "not built (XLA and LAPACK)"
    elif not _native.enabled():
        kernels = "switched off by ORTHOFUSE_JAX_NATIVE (XLA and LAPACK)"
    elif _native.isa() == "portable" and not _native.available():
        kernels = "the portable build, used only with ORTHOFUSE_JAX_NATIVE=force (XLA and LAPACK)"
    elif not _native.available():
        kernels = "no build for this CPU (x86-64 without AVX2; XLA and LAPACK)"
    else:
        kernels = f"the {_native.isa()} build"
    return (
        f"{PROG} {__version__} (jax {dist('jax')}, jaxlib {dist('jaxlib')}); "
        f"compiled CPU kernels: {kernels}"
    )


class _VersionAction(argparse.Action):
    """--version, computed when asked (argparse's own needs the text when the parser is built)."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())  # to stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training-free fusion of orthogonal GS (Group-and-Shuffle) diffusion adapters (OrthoFuse). "
        "Default merge: --method geodesic --restore cayley --t 0.6 (the reference's moft_merge preset); "
        "t = 0 is the concept adapter, t = 1 the style adapter.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, JAX's, and which build of the compiled CPU kernels runs here",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    merge_commands.register(sub)
    generate_commands.register(sub)
    train_command.register(sub)
    bake_command.register(sub)
    return parser


_EXTRAS = {
    **{m: "sdxl" for m in ("flax", "optax", "diffusers", "transformers", "PIL", "huggingface_hub")},
    "torch": "interop",
}
"""Top-level modules of the optional extras, and the extra that installs each."""


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .._runtime import configure_cpu_threads, enable_compile_cache, prefer_cublas_gemm

    configure_cpu_threads()  # before JAX starts (jaxlib < 0.11's LAPACK pool deadlock)
    from .._safetensors import AdapterFileError

    if getattr(
        args, "cublas_gemm", False
    ):  # the merges: many small products (see prefer_cublas_gemm)
        prefer_cublas_gemm()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if getattr(args, "prefetch", None):  # start reading the inputs while JAX is imported
                args.prefetch(args)
            enable_compile_cache()  # imports JAX
            rc = args.func(args)
        except (CLIError, AdapterFileError, ValueError, OSError) as e:
            _flush_warnings(caught)
            print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except ImportError as e:
            top = (e.name or "").split(".")[0]
            if top not in _EXTRAS:
                raise
            _flush_warnings(caught)
            print(
                f"{PROG} {args.command}: error: {top} is not installed; this command needs the "
                f"{_EXTRAS[top]} extra: pip install 'orthofuse-jax[{_EXTRAS[top]}]'",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        _flush_warnings(caught)
    return int(rc or 0)


def _flush_warnings(caught) -> None:
    seen = set()
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue
        msg = _one_line(w.message)
        if msg not in seen:
            seen.add(msg)
            print(f"{PROG}: warning: {msg}", file=sys.stderr)
    caught.clear()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
