"""Serving: CLoud rewards for RL loops and Best-of-N (docs/SERVING.md).

``types.py`` is the contract between the HTTP front (``server.py``) and the backends that produce
results: the static batcher (``static.py``: a batch is admitted and waits for its longest
critique) and the continuous-batching engine (``engine.py``: decode slots refilled between
compiled chunks of steps). ``protocol.py`` reads the two request shapes (OpenRLHF's and the
native one) field by field and holds the checks every backend shares.
"""
