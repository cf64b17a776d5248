"""Packaged recipes (YAML): quickstart, one per method, ci/ for the tiny model, bench/ for the real model."""
