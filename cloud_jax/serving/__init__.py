"""Serving: CLoud rewards for RL loops and Best-of-N.

``types.py`` is the contract between the HTTP front (``server.py``) and the backends that produce
results: a static batcher (a batch is admitted and waits for its longest critique) and the
continuous-batching engine (``engine.py``: decode slots refilled between compiled chunks of steps).
"""
