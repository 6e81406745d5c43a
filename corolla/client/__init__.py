"""The Corolla client: a model whose blocks run in the swarm, used like a local Hugging Face model.

- ``config.py``     ``ClientConfig``: every client setting, built once.
- ``swarm.py``      ``RemoteSwarm``: the client's peer, its view of the DHT records, chain planning.
- ``rpc.py``        calling one server: unary requests and the bidirectional stream of a session.
- ``sequential.py`` ``RemoteSequential``: the remote block stack as a differentiable, sliceable module.
- ``session.py``    ``InferenceSession``: step-by-step inference keeping attention caches on the servers.
- ``cache.py``      ``RemoteCache``: the Hugging Face ``Cache`` that ties ``generate()`` to a session.
- ``model.py``      ``DistributedLlamaForCausalLM``, ``DistributedBloomForCausalLM`` and the Auto class.
"""
