"""The continuous-batching engine: scheduler and block manager (host), model runner (device)."""
