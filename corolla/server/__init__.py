"""A Corolla server: holds a span of blocks, announces it, answers forward/backward/inference.

- ``config.py``    ``ServerConfig``: every setting, built once by the CLI (or a test) and passed down.
- ``server.py``    ``Server``: start-up (load, measure, announce), serving, graceful shutdown.
- ``handlers.py``  one stream per request: decode, validate, run, reply (errors become ``ErrorReply``).
- ``validation.py`` checks every request against what this server holds, before any compute.
- ``sessions.py``  inference sessions: attention cache, padding mask and position per session.
- ``cache.py``     ``CacheBudget``: reserves session cache tokens against the configured limit.
- ``announcer.py`` refreshes this server's DHT records before they expire.
- ``throughput.py`` measures tokens/s through the held blocks on this hardware.
"""
