"""The Markdown that run.py prints and writes next to the JSON."""

from __future__ import annotations

from typing import Any

from bench.stats import PERCENTILES, pkey


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _load(avg: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in avg) if avg else "?"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    load_note = "; Reserve with idempotency keys" if p["idempotency_keys"] else ""
    lines = [
        f"# spendgate bench — {m['date_utc']}",
        "",
        f"- commit `{m['git_commit']}`{' + uncommitted changes' if m.get('git_dirty') else ''}",
        f"- {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB; {m['os']}; Python {m['python']}, "
        f"grpcio {m['grpcio']}",
        f"- load average (1/5/15 min): {_load(m.get('loadavg_at_start'))} at start, "
        f"{_load(m.get('loadavg_at_end'))} at end (other work on the machine shows here)",
        f"- server: `spendgate serve` ({p['server_extra_args'] or 'default settings'}), {p['budgets']} budgets "
        f"with limit 2^53; load: {p['procs']} load-generator process(es), closed loop, warm-up {p['warmup_s']} s + "
        f"{p['duration_s']} s recorded per row{load_note}" + (" — **--quick smoke run**" if p["quick"] else ""),
        "",
    ]
    grpc_rows = result.get("grpc", [])
    if grpc_rows:
        lines += ["## gRPC, closed loop (latency in µs, measured in the client)", ""]
        header = ["RPC", "conc.", "ops/s"] + [f"p{q:g}" for q in PERCENTILES] + ["n", "CPU srv/cli %", "notes"]
        rows = []
        for r in grpc_rows:
            notes = []
            if r["denied"]:
                notes.append(f"{r['denied']} denied")
            if r["errors"]:
                notes.append("errors " + ", ".join(f"{k}×{v}" for k, v in r["errors"].items()))
            rows.append([r["label"], str(r["concurrency"]), _num(r["ops_per_s"], 0)]
                        + [_num(r[pkey(q)]) for q in PERCENTILES]
                        + [_num(r["count"]), f"{_num(r['server_cpu_pct'], 0)}/{_num(r['client_cpu_pct'], 0)}",
                           "; ".join(notes)])
        lines += _table(header, rows, "lr" + "r" * (len(header) - 3) + "l") + [""]
        lines += ["Reserve+Commit is one op = both RPCs back to back. CPU: % of one core used in the window by the "
                  "server process / by all load generators.", ""]

    ratio_rows = result.get("ratios", [])
    if ratio_rows:
        lines += ["## Ratios to Ping at the same concurrency (compare these across runs, not the absolutes)", ""]
        header = ["conc.", "Reserve p50 / Ping p50", "Reserve p99 / Ping p99", "Reserve+Commit p50 / Ping p50",
                  "Reserve tput / Ping tput", "Reserve+Commit tput / Ping tput"]
        rows = [[str(r["concurrency"]),
                 _num(r.get("reserve_p50_over_ping_p50"), 2), _num(r.get("reserve_p99_over_ping_p99"), 2),
                 _num(r.get("reserve_commit_p50_over_ping_p50"), 2), _num(r.get("reserve_tput_over_ping_tput"), 2),
                 _num(r.get("reserve_commit_tput_over_ping_tput"), 2)] for r in ratio_rows]
        lines += _table(header, rows) + [""]

    engine_rows = result.get("engine", [])
    if engine_rows:
        lines += ["## In-process engine (Python binding, one thread, no gRPC)", ""]
        header = ["figure", "ops/s", "p50 µs", "p99 µs", "mean µs"]
        rows = [[r["label"], _num(r["ops_per_s"], 0), _num(r.get("p50_us"), 2), _num(r.get("p99_us"), 2),
                 _num(r.get("mean_us"), 3)] for r in engine_rows]
        lines += _table(header, rows) + [""]
        lines += ["One engine op = reserve + commit (two binding calls). The no-op row is one empty Python call.", ""]

    checks = result.get("checks", {})
    if checks:
        lines += ["## Checks", ""]
        for name, c in checks.items():
            lines.append(f"- {name}: {'ok' if c['ok'] else '**MISMATCH**'} — {c['detail']}")
        lines.append("")
    return "\n".join(lines)
