"""Pure array operations on numpy or CuPy: geometry, resampling, components, left/right split, post-processing, statistics."""
