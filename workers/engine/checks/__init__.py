"""The engine's instruments: fidelity against the float model (verify), per-layer SQNR (layers) and latency
timing with the host's benchmark lock (bench). They know models and batches, not jobs or backends."""
