"""The Corolla client: a model whose blocks run in the swarm, used like a local Hugging Face model.

- ``config.py``     ``ClientConfig``: every client setting, built once.
- ``swarm.py``      ``RemoteSwarm``: the client's peer, its view of the DHT records, chain planning.
- ``rpc.py``        calling one server: unary requests and the bidirectional stream of a session (its replies
                    read in the background, so a wait can stop without cutting a frame).
- ``sequential.py`` ``RemoteSequential``: the remote block stack as a differentiable, sliceable module.
- ``session.py``    ``InferenceSession``: step-by-step inference keeping attention caches on the servers; relayed
                    steps, trails, probes of a silent chain, failover with replay, check sessions.
- ``cache.py``      ``RemoteCache``: the Hugging Face ``Cache`` that ties ``generate()`` to a session.
- ``model.py``      the distributed classes of every family (made from ``corolla.models`` families) and the Auto
                    classes.
- ``speculative.py`` speculative decoding: the acceptance rule, the adaptive draft length, one generation run.
- ``speculative_model.py`` ``AutoDistributedSpeculativeModel``: a distributed model that decodes speculatively.
- ``tuning.py``     soft prompts, deep prompts and client-side LoRA weights.
- ``verify.py``     output checks: the verdict on a span's outputs against other servers' (a session's check
                    session, or a stateless recompute); a third opinion settles a disagreement.
- ``failures.py``   which errors are a server's failure (fail over) and which the caller's (report).
"""
