"""Inference: the shared pipeline, its parts, schedulers, the guidance rule and `pimg generate`."""
