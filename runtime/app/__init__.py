"""flare-run: the CLI, the run plan, the output guard, batch, progress, preview and writing."""
