"""The bundle: bundle.json (schema, model card), model files and their hashes."""
