"""Test and benchmark harnesses that are not part of the library proper.

netns.py   ``NetnsSwarm``: a swarm whose DHT node, servers and clients run as separate "hosts" (Linux network
           namespaces on this machine) joined by an emulated network with per-host delay, rate and loss.
"""
