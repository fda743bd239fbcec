"""Compiled loops (numba on CPU): pure functions on numpy arrays, no Python objects.

Every kernel here works on arrays it is handed and returns arrays or scalars; ownership,
growth and validation live in the layers above.
"""
