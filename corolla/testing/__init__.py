"""Test and benchmark harnesses (also used by the CLI's ``swarm`` and ``demo``).

- ``memory.py``      ``MemoryNetwork`` / ``MemoryTransport``: a whole swarm's network in one process (streams between
                     event loops, a record store, link delays, kill and freeze).
- ``inprocess.py``   ``InProcessSwarm``: real servers on a ``MemoryNetwork`` in this process, and clients for them.
- ``local_swarm.py`` ``LocalSwarm``: a DHT node and N servers as child processes on loopback.
- ``netns.py``       ``NetnsSwarm``: a swarm whose DHT node, servers and clients run as separate "hosts" (Linux
                     network namespaces on this machine) joined by an emulated network with per-host delay, rate
                     and loss.
- ``tiny.py``        tiny random-weight models of every supported family, from their transformers configs.
- ``api_process.py`` starting and stopping ``corolla api`` / ``corolla health`` processes for tests.
- ``tap_switch.py``  the user-space switch ``NetnsSwarm`` uses where the kernel lacks ``sch_netem``.
"""
