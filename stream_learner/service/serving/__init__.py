"""``stream-learner serve``: the published versions served over the Open Inference Protocol (KServe V2).

``server.py`` wires it; ``follower.py`` decides which version serves (LATEST, or one pinned) and
``loader.py`` fetches it (manifest checked, every file it loads checked against its sha256, plain
transformers, warm-up); ``batcher.py`` batches concurrent requests and swaps versions between batches;
``http.py`` and ``protocol.py`` speak the protocol. docs/serving.md tells how to run it and what it
guarantees.
"""
