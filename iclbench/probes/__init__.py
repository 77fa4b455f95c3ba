"""Shared interpretability probes (registered through the same hook as third-party probes)."""
