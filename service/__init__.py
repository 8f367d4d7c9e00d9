"""The explanation service (FastAPI). Imports protopnet and model_store, never training."""

import os

# torch's OpenMP runtime (libgomp) keeps an idle worker spinning for about 300 000
# iterations, a few ms, after each parallel op before it sleeps. Between requests that
# burns a core the event loop, the workers and the clients need: on 2 cores the demo
# model's 1-client p99 went from 27 to 13 ms with 10 000 (about 0.1 ms), which still
# covers the gaps between the ops of one forward pass. libgomp reads this when torch
# loads, so it is set here, before anything imports torch; a value already set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
