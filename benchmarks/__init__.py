"""Scripts that measure the service, print a table and write raw JSON; they never assert on time.

- ``python -m benchmarks.serving``: the model in process, the service and a naive server.
- ``python -m benchmarks.decode``: decode + resize of a large JPEG with and without draft mode.
- ``benchmarks.naive_server``: the per-request endpoint ``benchmarks.serving`` compares against.
"""
