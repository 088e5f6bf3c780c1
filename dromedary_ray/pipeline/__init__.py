"""The driver: recipes of stages over one run directory."""
