"""`strop serve`: an OpenAI-compatible HTTP server over the decoding engine (models/engine.py).

limits.py holds the request schema and the caps, models.py loads the base and its LoRA runs and renders
prompts with each run's template, app.py is the HTTP surface, run.py starts it.
"""
