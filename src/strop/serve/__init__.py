"""`strop serve`: an OpenAI-compatible HTTP server over the decoding engine (models/engine.py).

run.py starts it (socket, uvicorn, draining on SIGTERM) and `build` loads what it serves;
variants.py loads the base and its LoRA runs, each with its own chat template; app.py wires the app:
routes.py holds the endpoints, state.py what they share, limits.py the request schema and the caps,
validation.py the checks a request passes before the engine sees it, reply.py and streaming.py the
whole and the streamed reply, errors.py OpenAI's error body.
"""
