"""Adapters as pytrees, merge methods and checkpoint I/O."""
