"""The OpenAI-compatible HTTP API (``corolla api``).

- ``engine.py`` ``Engine``: completions from the distributed model for many callers at once (worker threads, one
  session each, bounded concurrency, per-request sampling and seeds, log-probabilities, stop sequences,
  cancellation).
- ``app.py``    ``create_app``: the Starlette application: ``/v1/models``, ``/v1/chat/completions``,
  ``/v1/completions`` (plain and server-sent events), ``/api/status``; errors in OpenAI's format.
- ``serve.py``  ``run_api``: load the model and tokenizer, join the swarm, serve with uvicorn.
"""
