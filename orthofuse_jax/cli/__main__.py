"""``python -m orthofuse_jax.cli``: the ``orthofuse-jax`` command."""

import sys

from . import main

sys.exit(main())
