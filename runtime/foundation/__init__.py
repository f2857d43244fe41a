"""Foundation: errors, the label registry, atomic writes, process lifecycle. Imports nothing else of flare."""
