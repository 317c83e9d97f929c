"""Alignment vectors: extraction (`extract`) and per-domain knobs at inference (`knobs`)."""
