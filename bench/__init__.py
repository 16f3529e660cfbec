"""spendgate benchmarks. Run everything with `python bench/run.py` (see bench/README.md).

One concern per module:

    run.py            the one command: prerequisites, the sections, bench/out/*.json, bench/RESULTS.md, the PNGs
    setup.sh          installs what the bench needs (Debian packages, the `bench` pip extra)
    machine.py        what ran where: CPU, memory, commit, date, load average, an fsync probe
    engine_suites.py  the engine in process: runs criterion (rust/engine.rs) and pytest-benchmark (python/)
    server.py         start the real sidecar and the baseline servers; create the bench budgets; read the books
    services.py       start (and always stop) Postgres and Redis on loopback ports and temp dirs
    baselines/        the same gRPC service over Postgres, Redis and a naive check-then-write
    grpc_latency.py   the load generator, in separate processes: closed loop, open loop, the overspend race
    h2load.py         the same server measured by h2load, an independent HTTP/2 client
    profiling.py      py-spy and perf on the running server, summarized
    stats.py          percentiles and summaries of latency samples
    report.py         the Markdown (RESULTS.md)
    plots.py          the PNGs
"""
