"""Comparing recipes and backbones: sweeps that share their phases, and the few-shot probe."""
