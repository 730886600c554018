"""LLM servers, one concern per module.

- :mod:`~pipeline.servers.gpus`: GPU detection and the GPU memory sizing of SGLang servers.
- :mod:`~pipeline.servers.base`: the plan types (:class:`~pipeline.servers.base.ServerSpec`) and the
  :class:`~pipeline.servers.base.Backend` interface; :mod:`~pipeline.servers.sglang` and
  :mod:`~pipeline.servers.llamacpp` implement it.
- :mod:`~pipeline.servers.plan`: backend choice, server count and nominal ports (``plan_servers``).
- :mod:`~pipeline.servers.process`: ports, process groups, stopping, log tails, HTTP readiness waits.
- :mod:`~pipeline.servers.pool`: the managed pool (``ServerPool``).
- :mod:`~pipeline.servers.attach`: attach mode (servers started elsewhere).
- :mod:`~pipeline.servers.health`: health probes and restarts during a run.
- :mod:`~pipeline.servers.cpu_server`: the llama.cpp CPU server entry point.
"""
