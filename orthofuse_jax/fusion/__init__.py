"""Adapters as pytrees, merge methods and checkpoint I/O.

Public API (implementation in private-by-convention modules):

* adapters: :class:`GSAdapter`, :class:`LayerStack`, :func:`from_layers`, :func:`to_layers`,
  :func:`to_orthogonal`, :func:`to_cayley_params`, :func:`check_compatible`.
* block-level merges: :func:`geodesic_blocks`, :func:`cayley_space_blocks`, :func:`curve_over_id`,
  :func:`restore_exact`, :func:`karcher_mean_blocks`, :func:`cayley_mean_blocks`.
* adapter-level: :func:`merge`, :func:`sweep`, :func:`merge_report`, :class:`MergeError`.
* baselines: :func:`multiply` / :class:`MultipliedAdapter` (App. H.2), :func:`lora_merge` (App. H.1).
* scales: :func:`combine_scales`.
* files: :func:`load_adapter` (reference format, PEFT OFT, LyCORIS/kohya OFT, detected from the
  keys), :func:`save_adapter`, :func:`save_merged` (also checks the blocks' orthogonality);
  :func:`orthofuse_jax.fusion.peft.save_peft_oft` writes PEFT OFT folders and
  :mod:`orthofuse_jax.fusion.lycoris` reads and writes LyCORIS ``diag-oft`` files (output side).
"""

from ..geometry import GeodesicPath, geodesic_path
from .adapter import (
    SCALE_NAME,
    GSAdapter,
    LayerStack,
    check_compatible,
    from_layers,
    stack_key,
    to_cayley_params,
    to_layers,
    to_orthogonal,
)
from .baselines import LoraFactors, MultipliedAdapter, lora_merge, multiply
from .io import AdapterFileError, load_adapter, save_adapter, save_merged
from .karcher import cayley_mean_blocks, karcher_mean_blocks, karcher_mean_blocks_with_flag
from .maps import (
    cayley_space_blocks,
    curve_over_id,
    geodesic_blocks,
    orthogonality_error,
    restoration_factor,
    restore_exact,
)
from .merge import METHODS, RESTORES, MergeError, MergeReport, merge, merge_report, sweep
from .scales import SCALE_RULES, combine_scales

__all__ = [
    "METHODS",
    "RESTORES",
    "SCALE_NAME",
    "SCALE_RULES",
    "AdapterFileError",
    "GSAdapter",
    "GeodesicPath",
    "LayerStack",
    "LoraFactors",
    "MergeError",
    "MergeReport",
    "MultipliedAdapter",
    "cayley_mean_blocks",
    "cayley_space_blocks",
    "check_compatible",
    "combine_scales",
    "curve_over_id",
    "from_layers",
    "geodesic_blocks",
    "geodesic_path",
    "karcher_mean_blocks",
    "karcher_mean_blocks_with_flag",
    "load_adapter",
    "lora_merge",
    "merge",
    "merge_report",
    "multiply",
    "orthogonality_error",
    "restoration_factor",
    "restore_exact",
    "save_adapter",
    "save_merged",
    "stack_key",
    "sweep",
    "to_cayley_params",
    "to_layers",
    "to_orthogonal",
]
