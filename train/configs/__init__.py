"""The training recipes (JSON): flare23 (the paper) and tiny (CPU demo); package data of the wheel."""
