"""Figures (plots.py) and what the self-contained HTML pages share (pages.py)."""
