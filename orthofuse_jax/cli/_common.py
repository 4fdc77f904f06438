"""What every command module shares: the program name, the exit status of a bad input, its error."""

PROG = "orthofuse-jax"
EXIT_BAD_INPUT = 2


class CLIError(ValueError):
    """A bad command-line input; reported as one line with exit status 2."""
