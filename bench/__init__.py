"""spendgate benchmarks. Run everything with `python bench/run.py` (see bench/README.md).

One concern per module, so that later benchmarks (baselines, comparisons) are new modules plus a line in run.py:

    machine.py        what ran where: CPU, memory, commit, date
    stats.py          percentiles and summaries of latency samples
    server.py         start the real sidecar on a temp data dir; create the bench budgets
    grpc_latency.py   closed-loop gRPC load from separate processes: Ping, Reserve, Reserve+Commit
    engine_inproc.py  the engine through the Python binding, no gRPC; and the bare-Python floor
    report.py         the Markdown tables
    run.py            the one command: argparse, runs the suites, writes bench/out/*.json and *.md
"""
