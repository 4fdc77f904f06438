"""Shape-annotated array aliases used across the geometry package (jaxtyping)."""

from __future__ import annotations

from jaxtyping import Array, Bool, Float

Blocks = Float[Array, "*batch nb b b"]
"""A stack of square blocks; any leading batch axes."""

Block = Float[Array, "*batch b b"]
"""Square matrices with any leading batch axes (a block stack is a special case)."""

Vector = Float[Array, "*batch n"]

__all__ = ["Array", "Block", "Blocks", "Bool", "Float", "Vector"]
