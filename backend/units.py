"""The model's unit: the one definition every layer shares (geometry, scans, model, server).

The model frame is normalised so that a face fits in the unit sphere: one model unit is 100 mm.
"""
MM_PER_UNIT: float = 100.0
