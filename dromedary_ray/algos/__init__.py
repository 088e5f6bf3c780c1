"""Pure-Python algorithms (no Ray, no torch) used by the pipeline stages."""
