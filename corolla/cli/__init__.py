"""The ``corolla`` command line: argument parsing -> one config object -> an entry point.

- ``main.py``        the parser and the subcommands (dht, serve, swarm, generate, chat, api, health, demo); ``swarm`` and
                     ``demo`` start their processes with ``corolla.testing.local_swarm.LocalSwarm``.
- ``dht_node.py``    the bootstrap node behind ``corolla dht``.
- ``chatting.py``    text generation and chat on the terminal, streaming tokens.
"""
