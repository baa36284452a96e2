"""The speed benchmark suite: ``python -m benchmarks.speed`` (``make bench``).

Runs every scenario of docs/benchmarks.md on this machine in one run: the model's own limit
in process, a plain FastAPI peer, TorchServe with the toolkit's handlers (batch 1 and tuned
by a sweep), the router (REST and gRPC), torch.compile + bf16, and a minimal hand-written
handler; then writes the tables, plots and benchmarks/results/latest.json.
"""
