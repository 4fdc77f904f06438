"""Pure JAX manifold math for GS-orthogonal matrices.

No I/O, no adapters, no diffusers. Every function takes stacked blocks ``[..., nb, b, b]`` (or
``[..., b, b]``), keeps the input dtype, and is safe under ``jax.jit`` and ``jax.vmap``. Only
matmuls, ``solve`` and ``eigh`` are used on merge paths (no ``eig``, ``schur`` or host callbacks).
The products with one GS layer (``gs_apply``, ``gs_apply_transpose``, ``act``, ``orbit_map``,
``sign_stabilizer_element``) take a single ``[nb, b, b]`` layer; map them over stacks of layers
with ``jax.vmap`` (tests/geometry/test_jit_vmap.py checks vmap against a loop).
``is_concrete`` says whether arrays (or pytrees of them) hold values rather than tracers.
"""

from ._linalg import cpu_only, solve_pd
from .cayley import cayley, eye_like, inverse_cayley, relative_cayley, rotation_parameters, skew
from .geodesic import (
    GeodesicPath,
    curve_speed,
    geodesic,
    geodesic_distance,
    geodesic_path,
    geodesic_path_cayley,
    geodesic_speed,
    geodesic_with_flag,
    relative_rotation,
)
from .group import (
    act,
    group_dimension,
    orbit_dimension,
    orbit_map,
    sign_stabilizer_element,
    stabilizer_dimension,
    stabilizer_dimension_formula,
    stabilizer_is_discrete,
)
from .gs import block_diag, gs_apply, gs_apply_transpose, gs_dense, gs_shape
from .polynomial import LOG_POLYNOMIAL_MAX_ANGLE, expm_skew_taylor, log_polynomial
from .shuffle import (
    perfect_shuffle,
    perfect_shuffle_indices,
    perfect_shuffle_matrix,
    perfect_unshuffle,
)
from .spectral import (
    DEFAULT_ANGLE_TOL,
    LOG_ALGORITHMS,
    NegativeEigenvalueError,
    expm_skew,
    is_concrete,
    log,
    log_with_flag,
    power,
    rotation_angles,
    spectral_map,
    spectral_map_with_flag,
)

__all__ = [
    "DEFAULT_ANGLE_TOL",
    "LOG_ALGORITHMS",
    "LOG_POLYNOMIAL_MAX_ANGLE",
    "GeodesicPath",
    "NegativeEigenvalueError",
    "act",
    "block_diag",
    "cayley",
    "cpu_only",
    "curve_speed",
    "expm_skew",
    "expm_skew_taylor",
    "eye_like",
    "geodesic",
    "geodesic_distance",
    "geodesic_path",
    "geodesic_path_cayley",
    "geodesic_speed",
    "geodesic_with_flag",
    "group_dimension",
    "gs_apply",
    "gs_apply_transpose",
    "gs_dense",
    "gs_shape",
    "inverse_cayley",
    "is_concrete",
    "log",
    "log_polynomial",
    "log_with_flag",
    "orbit_dimension",
    "orbit_map",
    "perfect_shuffle",
    "perfect_shuffle_indices",
    "perfect_shuffle_matrix",
    "perfect_unshuffle",
    "power",
    "relative_cayley",
    "relative_rotation",
    "rotation_angles",
    "rotation_parameters",
    "sign_stabilizer_element",
    "skew",
    "solve_pd",
    "spectral_map",
    "spectral_map_with_flag",
    "stabilizer_dimension",
    "stabilizer_dimension_formula",
    "stabilizer_is_discrete",
]
