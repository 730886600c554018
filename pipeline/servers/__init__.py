"""LLM servers: GPU sizing, launch plans per backend, the managed pool, attach mode, health probes."""
