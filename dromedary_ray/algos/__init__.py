"""Pure algorithms used by the stages: text functions, and tensor functions on torch alone.

Nothing here imports Ray, vLLM or DeepSpeed, so every function tests in milliseconds.
"""
