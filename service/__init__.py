"""The explanation service (FastAPI). Imports protopnet and model_store, never training."""
