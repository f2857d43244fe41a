"""flare-serve (Triton) and its client."""
