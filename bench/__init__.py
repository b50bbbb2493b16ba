"""Benchmark harness for the storage element (issue 10).

* ``bench.ceiling``  - minimal durable aiohttp file server: the upper bound ("ceiling").
* ``bench.load``     - async load client with a small per-deployment target adapter.
* ``bench.procstat`` - /proc sampler for a server's RSS and CPU time.
* ``python -m bench`` - the orchestrator: starts the servers, runs scenarios, writes reports.

See ``bench/README.md``.
"""
