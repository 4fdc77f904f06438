"""Alternative formulations of the Cayley / log / power solves, timed at SDXL batch sizes."""
