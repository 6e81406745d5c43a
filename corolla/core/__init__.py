"""Pure logic shared by the client and the server; no I/O, no torch.

- ``blocks.py``  ``BlockRange``: a half-open span of transformer blocks, parsing ``"a:b"``.
- ``records.py`` ``ServerRecord`` and ``ServerState``: what a server announces for each of its blocks.
- ``errors.py``  the error types a user sees, each with a message naming the cause.
- ``spans.py``   coverage of a model's blocks by servers: finding gaps, choosing a span, deciding a move.
- ``routing.py`` chain planning (least time per step; throughput-weighted batches) and bans with backoff.
- ``status.py``  the live status line of long-running commands and the log format (text or JSON lines); this one
  writes to the terminal.
"""
