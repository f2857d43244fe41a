"""The Segmenter: one funnel every entry point goes through; a typed result and report; limits. Never writes files."""
