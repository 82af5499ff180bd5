"""Thin entry points: `python -m jobs.label|review|export|train|demo`."""
