"""A Corolla server: holds a span of blocks, announces it, answers forward/backward/inference.

The request path, in order: ``dispatch`` (by the service table) -> ``handlers`` (validation, sessions) ->
``scheduler`` (priority queue in front of the one compute thread) -> ``compute`` (torch work).

- ``config.py``     ``ServerConfig``: every setting, built once by the CLI (or a test) and passed down.
- ``server.py``     ``Server``: start-up (load, measure, announce), serving, moving, graceful shutdown; the real
                    transport (``hivemind_server``) and ``run_server`` for the CLI.
- ``dispatch.py``   ``Dispatcher``: one stream per exchange; ``SessionChannel`` for session streams; errors as
                    ``ErrorReply``.
- ``handlers.py``   ``RequestHandlers``: one method per service: validate, queue the compute, build the reply.
- ``scheduler.py``  ``Scheduler``: runs jobs on the compute thread, inference before training; batches sessions'
                    steps up to the block stack's ``rows_per_pass``.
- ``compute.py``    ``BlockCompute``: forward, backward (kept activations or recompute), session steps.
- ``sessions.py``   ``SessionState`` (per-session cache, mask, position; step validation) and ``SessionTable``.
- ``activations.py`` ``ActivationStore``: training activations kept between forward and backward.
- ``cache.py``      ``CacheBudget``: reserves session cache tokens against the configured limit.
- ``frames.py``     ``FrameBudget``: request frames held at once (by the bytes that arrived), all streams together,
                    with a share per peer.
- ``relay.py``      pushing a relayed step on to the next server of a chain (with its trail and this server's tag), over
                    one stream per next server shared by the sessions relayed there.
- ``announcer.py``  refreshes this server's DHT records before they expire.
- ``throughput.py`` measures tokens/s through the held blocks on this hardware.
"""
