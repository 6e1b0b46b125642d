"""The HTTP service: a FastAPI application over the control layer and the engine."""
