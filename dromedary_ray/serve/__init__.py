"""Serving: an OpenAI-compatible Ray Serve app over vLLM, and a terminal chat client."""
