"""Moved to `sar_hf.data.cluttered_digits`; this path keeps working for code written against it."""

from .data.cluttered_digits import compose_canvas, load_cluttered_digits_dataset

__all__ = ["compose_canvas", "load_cluttered_digits_dataset"]
