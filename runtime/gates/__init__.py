"""The gates: frame quality, task head, OOD heads, fusion and the risk-controlled acceptance rule."""
