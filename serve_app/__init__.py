"""Ray Serve app: an OpenAI-compatible graph of base-model and aligner deployments (see app.py)."""
