"""The OpenAI-compatible HTTP API (``corolla api``).

- ``engine.py`` ``Engine``: completions from the distributed model for many callers at once (worker threads, one
  session each, bounded concurrency, per-request sampling and seeds, log-probabilities, stop sequences,
  cancellation).
- ``app.py``    ``create_app``: the Starlette application: ``/v1/models``, ``/v1/chat/completions``,
  ``/v1/completions`` (plain and server-sent events), ``/api/status``; errors in OpenAI's format.
- ``page.py``   the swarm page's routes: ``/``, ``/static/*``, ``/api/swarm``.
- ``swarm_view.py`` ``SwarmView``: the swarm as the page shows it (JSON) and ``format_table`` for the terminal.
- ``serve.py``  ``run_api`` and ``run_health``: join the swarm, serve with uvicorn (or print the table).
"""
