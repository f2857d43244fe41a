"""Foundation: errors, the label registry, lazy imports, atomic writes, the version, a test hook. Imports nothing else
of flare."""
