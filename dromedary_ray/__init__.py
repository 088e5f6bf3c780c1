"""dromedary-ray: principle-driven alignment (Self-Align, SALMON, I-SHEEP) on Ray.

Nothing heavy is imported here, so `import dromedary_ray.algos...` stays fast and Ray-free.
"""

__version__ = "0.1.0"
