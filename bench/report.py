"""bench/RESULTS.md (and bench/out/*.md): the tables, the ratios, the targets, the profile. Rendered from the JSON."""

from __future__ import annotations

import math
import re
from typing import Any

from bench.stats import PERCENTILES, pkey

TARGET_RESERVE_P50_RATIO = 1.15
TARGET_RC_TPUT_RATIO = 0.8
TARGET_VS_POSTGRES = 2.0
BASELINE_NAMES = {
    "postgres": "Postgres (guarded UPDATE)",
    "redis": "Redis (Lua script)",
    "naive": "naive check-then-write (Postgres SELECT, then UPDATE)",
}


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _ms(us: Any) -> str:
    """Microseconds as a short human figure: µs below 1 ms, else ms."""
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "-"
    return f"{us:,.0f} µs" if us < 1000 else f"{us / 1000:,.2f} ms"


def _load(avg: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in avg) if avg else "?"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return (
        ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
        + ["| " + " | ".join(r) + " |" for r in rows]
        + [""]
    )


def _by(rows: list[dict[str, Any]], kind: str, conc: int) -> dict[str, Any] | None:
    for r in rows:
        if r["kind"] == kind and r["concurrency"] == conc:
            return r
    return None


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not b.get(key) or not a.get("count", 1):
        return None
    va, vb = a.get(key), b.get(key)
    if va is None or vb is None or vb != vb or va != va or vb == 0:
        return None
    return float(va) / float(vb)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and how far it is."""
    rows = result.get("grpc", [])
    out: list[dict[str, Any]] = []
    concs = sorted({r["concurrency"] for r in rows})
    # 1. Reserve p50 within 1.15x of the empty RPC's on the same server.
    per_conc = []
    for c in concs:
        ratio = _ratio(_by(rows, "reserve", c), _by(rows, "ping", c), "p50_us")
        if ratio is not None:
            per_conc.append((f"c={c}", ratio))
    for r in result.get("h2load", []):
        if r["kind"] == "reserve":
            ratio = _ratio(r, _by(result["h2load"], "ping", r["concurrency"]), "p50_us")
            if ratio is not None:
                per_conc.append((f"h2load c={r['concurrency']}", ratio))
    if per_conc:
        worst = max(v for _, v in per_conc)
        out.append(
            {
                "target": f"Reserve p50 ≤ {TARGET_RESERVE_P50_RATIO}× Ping p50 (same server)",
                "measured": ", ".join(f"{k}: {v:.2f}×" for k, v in per_conc),
                "met": worst <= TARGET_RESERVE_P50_RATIO,
                "how_far": _over("worst", worst, TARGET_RESERVE_P50_RATIO, lower_is_better=True),
            }
        )
    # 2. Reserve+Commit throughput at 64 >= 0.8x the empty RPC's.
    c64 = max(concs) if concs else None
    rc, ping = (_by(rows, "reserve_commit", c64), _by(rows, "ping", c64)) if c64 else (None, None)
    ratio = _ratio(rc, ping, "ops_per_s")
    if ratio is not None and rc and ping:
        out.append(
            {
                "target": f"Reserve+Commit throughput at c={c64} ≥ {TARGET_RC_TPUT_RATIO}× Ping throughput",
                "measured": f"{rc['ops_per_s']:,.0f} pairs/s vs {ping['ops_per_s']:,.0f} Pings/s = {ratio:.2f}× "
                f"(in RPCs: {2 * ratio:.2f}×)" + _h2load_ping_note(result, rc, c64),
                "met": ratio >= TARGET_RC_TPUT_RATIO,
                "how_far": _over("", ratio, TARGET_RC_TPUT_RATIO, lower_is_better=False),
            }
        )
    # 3. >= 2x the Postgres baseline's throughput, with zero overspend.
    pg = result.get("baselines", {}).get("postgres")
    race = result.get("race")
    if pg and rc:
        pg_rc = _by(pg["grpc"], "reserve_commit", c64)
        ratio = _ratio(rc, pg_rc, "ops_per_s")
        zero = race is not None and race["overspend_units"] == 0 and race["server_overspend_units"] == 0
        if ratio is not None and pg_rc:
            out.append(
                {
                    "target": f"≥ {TARGET_VS_POSTGRES:g}× the Postgres baseline's throughput, zero overspend",
                    "measured": f"Reserve+Commit at c={c64}: {rc['ops_per_s']:,.0f} vs "
                    f"{pg_rc['ops_per_s']:,.0f} pairs/s "
                    f"= {ratio:.2f}×; overspend {race['overspend_units'] if race else '?'} units",
                    "met": ratio >= TARGET_VS_POSTGRES and zero,
                    "how_far": _over("", ratio, TARGET_VS_POSTGRES, lower_is_better=False)
                    + ("" if zero else "; OVERSPEND is not zero"),
                }
            )
    naive = result.get("baselines", {}).get("naive")
    if naive:
        nr = naive["race"]
        out.append(
            {
                "target": "the naive baseline's overspend shown",
                "measured": f"{nr['overspend_units']:+,} units over {nr['limit_total']:,} of limits "
                f"({100 * nr['overspend_units'] / nr['limit_total']:.1f}%) in {nr['rounds']} race(s) of 64 "
                f"clients",
                "met": True,
                "how_far": "shown" if nr["overspend_units"] > 0 else "shown: no overspend this time (a race can miss)",
            }
        )
    return out


def _h2load_ping_note(result: dict[str, Any], rc: dict[str, Any], conc: int) -> str:
    """The same pairs against h2load's Ping on the same server: our load generator caps its own Ping rate."""
    h2 = _by(result.get("h2load", []), "ping", conc)
    if not h2 or not h2.get("ops_per_s"):
        return ""
    return (
        f"; against h2load's {h2['ops_per_s']:,.0f} Pings/s on the same server: "
        f"{rc['ops_per_s'] / h2['ops_per_s']:.2f}×"
    )


def _over(prefix: str, value: float, target: float, *, lower_is_better: bool) -> str:
    met = value <= target if lower_is_better else value >= target
    lead = f"{prefix} " if prefix else ""
    if met:
        return f"met ({lead}{value:.2f}× vs {target:g}×)"
    if lower_is_better:
        return f"missed: {lead}{value:.2f}× is {value / target:.2f}× the target"
    return f"missed: {value:.2f}× is {100 * value / target:.0f}% of the target"


def render(result: dict[str, Any], plots: list[str] | None = None) -> str:
    m = result["machine"]
    p = result["params"]
    fsync = m.get("fsync_probe") or {}
    lines = [
        "# spendgate benchmark results",
        "",
        "Generated by `python bench/run.py`"
        + (" --quick (a smoke run: too short to compare)" if p["quick"] else "")
        + "; see bench/README.md for what each figure means. **Compare ratios measured in the same run**, not "
        "absolutes across machines.",
        "",
        f"- date (UTC): {m['date_utc']}; commit `{m['git_commit']}`"
        + (" + uncommitted changes" if m.get("git_dirty") else ""),
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB; {m['os']}; Python {m['python']}, "
        f"grpcio {m['grpcio']}",
        f"- load average (1/5/15 min): {_load(m.get('loadavg_at_start'))} at start, {_load(m.get('loadavg_at_end'))} "
        "at end (the end figure counts the bench's own processes too); the load generators and every server share "
        "these CPUs",
        f"- disk: 4 KiB write + fsync p50 {_num(fsync.get('p50_us'), 0)} µs, p99 {_num(fsync.get('p99_us'), 0)} µs "
        "(in the temp dir the data dirs use)",
        f"- run: {result.get('elapsed_s', '?')} s; gRPC rows: warm-up {p['warmup_s']} s + {p['duration_s']} s "
        f"recorded, {p['procs']} load-generator process(es) (one HTTP/2 connection each); sidecar `spendgate serve "
        f"{result.get('server', {}).get('args', '')}` (durability fsync)",
        "",
    ]
    flagged = [(who, r) for who, r in _all_rows(result) if (r.get("other_cpu_pct") or 0) > DISTURBED_PCT]
    total = len([1 for _, r in _all_rows(result) if r.get("other_cpu_pct") is not None])
    if total:
        worst = max(max(0.0, r.get("other_cpu_pct") or 0.0) for _, r in _all_rows(result))
        bullet = (
            f"- other work on the machine during the measurements: {len(flagged)} of {total} rows had more "
            f"than {DISTURBED_PCT:.0f}% of a core busy outside the bench's own processes (worst {worst:.0f}%)"
            + (": those rows are marked ⚠ and are not worth comparing" if flagged else ": a quiet run")
        )
        lines.insert(len(lines) - 1, bullet)  # in the list above, before its closing blank line
    if p.get("missing"):
        lines += [
            f"**Missing on this machine, sections skipped:** {', '.join(p['missing'])} (`sudo bash bench/setup.sh`).",
            "",
        ]

    tgt = targets(result)
    if tgt:
        lines += ["## Targets", ""]
        lines += _table(
            ["target", "measured (this run)", "status"],
            [[t["target"], t["measured"], ("**met**: " if t["met"] else "") + t["how_far"]] for t in tgt],
            "lll",
        )
        lines += [WHY_TARGETS, ""]

    lines += _engine_sections(result)
    lines += _grpc_sections(result)
    lines += _baseline_sections(result)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
        lines += [
            "Latency CDF: closed loop, every recorded request, in the client. Throughput: closed loop; Ping is "
            "the same server's empty RPC; × marks are h2load against the same spendgate server.",
            "",
        ]
    lines += _profile_section(result)
    from bench import settle_throughput  # noqa: PLC0415  (bench/ is a package run from the repo root)

    lines += settle_throughput.render(result.get("settlement", []))
    lines += settle_throughput.render_backlog(result.get("settlement_backlog"))
    lines += settle_throughput.render_keeping_up(result.get("settlement_keeping_up", []))
    checks = result.get("checks", {})
    if checks:
        lines += ["## Checks (correctness, never speed)", ""]
        for name, c in checks.items():
            lines.append(f"- {name}: {'ok' if c['ok'] else '**FAILED**'} — {c['detail']}")
        lines.append("")
    return "\n".join(lines)


def _engine_sections(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rust = result.get("rust")
    binding = result.get("binding")
    if not rust and not binding:
        return lines
    lines += ["## 1. The engine, in process", ""]
    if rust:
        lines += ["### Rust (criterion, `cargo bench --bench engine`, bench/rust/engine.rs)", ""]
        if "error" in rust:
            lines += [f"Not run: {rust['error']}", ""]
        else:
            lines += _table(
                ["benchmark", "ops/s", "ns per op", "ops/s 95% CI"],
                [
                    [
                        f"`{r['id']}`",
                        _num(r["ops_per_s"], 0),
                        _num(r["ns_per_op"], 1),
                        f"{r['ops_per_s_ci'][0]:,.0f} – {r['ops_per_s_ci'][1]:,.0f}",
                    ]
                    for r in rust["rows"]
                ],
            )
            lines += [RUST_NOTES, ""]
    if binding:
        lines += ["### Python binding (pytest-benchmark, `python -m pytest bench/python --benchmark-only`)", ""]
        if "error" in binding:
            lines += [f"Not run: {binding['error']}", ""]
        else:
            lines += _table(
                ["figure", "ops/s", "µs per op (median)", "rounds"],
                [
                    [r["figure"], _num(r["ops_per_s"], 0), _num(r["us_per_op_median"], 2), str(r["rounds"])]
                    for r in binding["rows"]
                ],
            )
    return lines


DISTURBED_PCT = 40.0  # other work on the machine, % of one core, above which a row is flagged


def _cpu3(r: dict[str, Any]) -> str:
    """server / load generator / rest of the machine, % of one core; the baseline's database before the rest."""
    parts = [_num(r.get("server_cpu_pct"), 0), _num(r.get("client_cpu_pct"), 0)]
    if r.get("backing_cpu_pct") is not None:
        parts.append(_num(r.get("backing_cpu_pct"), 0))
    other = r.get("other_cpu_pct")
    if other is not None:
        other = max(0.0, other)  # per-process and whole-machine accounting differ by a few ticks: never below 0
    mark = "⚠" if other is not None and other > DISTURBED_PCT else ""
    return "/".join(parts + [_num(other, 0) + mark])


def _all_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [("spendgate", r) for r in result.get("grpc", []) + result.get("open_loop", [])]
    rows += [("h2load", r) for r in result.get("h2load", []) + result.get("h2load_relaxed", [])]
    for name, b in result.get("baselines", {}).items():
        rows += [(name, r) for r in b["grpc"]]
    return rows


def _error_notes(r: dict[str, Any]) -> str:
    """Denials and errors, with the first message of each error code."""
    notes = [f"{r['denied']} denied"] if r.get("denied") else []
    details = r.get("error_details") or {}
    for code, count in (r.get("errors") or {}).items():
        notes.append(f"{code}×{count}" + (f' ("{details[code]}")' if details.get(code) else ""))
    return "; ".join(notes).replace("|", "/")


def _cpu_per_op(r: dict[str, Any]) -> float | None:
    """The server's CPU microseconds per op: its CPU share over the window divided by the ops per second."""
    cpu, ops = r.get("server_cpu_pct"), r.get("ops_per_s")
    if cpu is None or not ops:
        return None
    return cpu / 100.0 / ops * 1e6


def _lat_cells(r: dict[str, Any]) -> list[str]:
    return [_num(r.get(pkey(q))) for q in PERCENTILES]


def _grpc_sections(result: dict[str, Any]) -> list[str]:
    rows = result.get("grpc", [])
    if not rows:
        return []
    lines = [
        "## 2. The sidecar over gRPC",
        "",
        "### Closed loop, our load generator (latency in µs, in the client)",
        "",
    ]
    header = (
        ["RPC", "conc.", "ops/s"]
        + [f"p{q:g}" for q in PERCENTILES]
        + ["n", "CPU srv/cli/other %", "srv CPU µs/op", "notes"]
    )
    table = []
    for r in rows:
        table.append(
            [r["label"], str(r["concurrency"]), _num(r["ops_per_s"], 0)]
            + _lat_cells(r)
            + [_num(r["count"]), _cpu3(r), _num(_cpu_per_op(r), 0), _error_notes(r)]
        )
        for part in ("reserve_in_rc", "commit"):
            pr = r.get("parts", {}).get(part)
            if pr:
                label = "↳ Commit (in R+C)" if part == "commit" else "↳ Reserve (in R+C)"
                table.append(
                    [label, str(r["concurrency"]), _num(pr["ops_per_s"], 0)]
                    + _lat_cells(pr)
                    + [_num(pr["count"]), "", "", ""]
                )
    lines += _table(header, table, "lr" + "r" * (len(header) - 3) + "l")
    lines += [
        "Reserve+Commit is one op = a Reserve, then a Commit of that hold: two RPCs, two durable changes; its "
        "↳ rows time each half. CPU, in % of one core over the window: the server process (all its threads: "
        "the event loop, grpc's threads, the LMDB writer, and the kernel work they cause) / the load "
        f"generator / the rest of the machine (near 0 when quiet, give or take 20: per-process and whole-machine "
        f"CPU accounting differ; shown as 0 when below; ⚠ above "
        f"{DISTURBED_PCT:.0f}%: another job shared the CPUs). srv CPU µs/op = the server's CPU time per op (per pair "
        "for Reserve+Commit).",
        "",
    ]
    ratio_rows = result.get("ratios", [])
    if ratio_rows:
        lines += ["### Ratios to Ping at the same concurrency (same server, same run)", ""]
        lines += _table(
            [
                "conc.",
                "Reserve p50 / Ping p50",
                "Reserve p99 / Ping p99",
                "Reserve+Commit p50 / Ping p50",
                "Reserve tput / Ping tput",
                "Reserve+Commit tput / Ping tput",
            ],
            [
                [
                    str(r["concurrency"]),
                    _num(r.get("reserve_p50_over_ping_p50"), 2),
                    _num(r.get("reserve_p99_over_ping_p99"), 2),
                    _num(r.get("reserve_commit_p50_over_ping_p50"), 2),
                    _num(r.get("reserve_tput_over_ping_tput"), 2),
                    _num(r.get("reserve_commit_tput_over_ping_tput"), 2),
                ]
                for r in ratio_rows
            ],
        )
    open_rows = result.get("open_loop", [])
    if open_rows:
        lines += ["### Open loop: fixed arrival rates, latency from the scheduled send time (µs)", ""]
        lines += _table(
            ["RPC", "rate /s", "done /s"]
            + [f"p{q:g}" for q in PERCENTILES]
            + ["n", "late sends", "CPU srv/cli/other %", "notes"],
            [
                [r["label"], _num(r["rate_per_s"], 0), _num(r["ops_per_s"], 0)]
                + _lat_cells(r)
                + [_num(r["count"]), _num(r["late_sends"]), _cpu3(r), _error_notes(r)]
                for r in open_rows
            ],
            "lrr" + "r" * len(PERCENTILES) + "rrrl",
        )
        lines += [
            "Open loop sends on schedule whether or not replies came back: where the rate is more than the stack "
            "sustains, latency climbs through the window (the queue grows) instead of throughput climbing. "
            "`late sends`: sends that left > 1 ms after their scheduled time because the load generator itself "
            "was behind (still timed from the schedule).",
            "",
        ]
    for key, title in (
        ("h2load", "### h2load, an independent HTTP/2 client (same fsync server; µs)"),
        ("h2load_relaxed", "### h2load against a sidecar with `--durability relaxed` (no fsync; µs)"),
    ):
        hrows = result.get(key, [])
        if not hrows:
            continue
        lines += [title, ""]
        table = []
        for r in hrows:
            ping = _by(hrows, "ping", r["concurrency"])
            ratio = ""
            if r["kind"] == "reserve" and ping:
                ratio = (
                    f"p50 {r['p50_us'] / ping['p50_us']:.2f}×, tput {r['ops_per_s'] / ping['ops_per_s']:.2f}× of Ping"
                )
            table.append(
                [r["kind"].capitalize(), str(r["concurrency"]), _num(r["ops_per_s"], 0)]
                + _lat_cells(r)
                + [_num(r["count"]), _cpu3(r), _num(_cpu_per_op(r), 0), ratio]
            )
        lines += _table(
            ["RPC", "streams", "req/s"]
            + [f"p{q:g}" for q in PERCENTILES]
            + ["n", "CPU srv/h2load/other %", "srv CPU µs/req", "vs Ping"],
            table,
            "lrr" + "r" * len(PERCENTILES) + "rrrl",
        )
        if key == "h2load":
            cmd = re.sub(r"-m \d+", "-m C", next((r["argv"] for r in hrows if r["kind"] == "reserve"), ""))
            lines += [
                f"One connection, C streams in flight: `{cmd}` (body: a pre-encoded gRPC message). h2load "
                "cannot chain a Commit to its Reserve, so it measures Ping and Reserve only.",
                "",
            ]
        else:
            lines += [
                "The same server code with the disk taken out: the gap to the fsync rows above is what "
                "durability costs; the gap left to Ping is the check itself.",
                "",
            ]
    race = result.get("race")
    if race:
        lines += [
            f"### Overspend race: 64 clients, one budget of {race['limit']:,} units, Reserve({race['amount']}) "
            "→ Commit until denied",
            "",
            f"spendgate granted {race['granted_units']:,} units against {race['limit_total']:,} of limits in "
            f"{race['rounds']} race(s): overspend **{race['overspend_units']:+,}** (server books "
            f"{race['server_overspend_units']:+,}); {race['ops_per_s']:,.0f} ops/s on the one hot budget, "
            f"p50 {_ms(race['p50_us'])}, p99 {_ms(race['p99_us'])}.",
            "",
        ]
    return lines


def _baseline_sections(result: dict[str, Any]) -> list[str]:
    base = result.get("baselines")
    if not base:
        return []
    servers = result.get("baseline_servers", {})
    ours = result.get("grpc", [])
    concs = sorted({r["concurrency"] for b in base.values() for r in b["grpc"]})
    lines = [
        "## 3. Baselines behind the same gRPC front",
        "",
        f"The same grpc.aio front and load generator; only the budget check differs. {servers.get('postgres', '')}"
        f" ({servers.get('postgres_settings', '')}); {servers.get('redis', '').split(' sha=')[0]} "
        f"({servers.get('redis_settings', '')}); {servers.get('pool_size', '?')} connections per baseline server. "
        "All four acknowledge a change only once it is on disk.",
        "",
    ]
    systems = [("spendgate", {"grpc": ours, "race": result.get("race")})] + list(base.items())
    header = (
        ["system"]
        + [f"Reserve ops/s c={c}" for c in concs]
        + [f"R+C pairs/s c={c}" for c in concs]
        + [f"R+C p50 c={concs[-1]}", f"R+C p99 c={concs[-1]}", "overspend, 64 clients", "vs Postgres R+C"]
    )
    pg_rc = _by(base["postgres"]["grpc"], "reserve_commit", concs[-1]) if "postgres" in base else None
    table = []
    for name, data in systems:
        rc_top = _by(data["grpc"], "reserve_commit", concs[-1])
        race = data.get("race")
        over = "-"
        if race:
            pct = 100 * race["overspend_units"] / race["limit_total"]
            over = f"{race['overspend_units']:+,} units ({pct:.1f}%)"
            if race["overspend_units"] > 0:
                over = f"**{over}**"
        vs = _ratio(rc_top, pg_rc, "ops_per_s")
        table.append(
            [BASELINE_NAMES.get(name, "**spendgate**")]
            + [_num((_by(data["grpc"], "reserve", c) or {}).get("ops_per_s"), 0) for c in concs]
            + [_num((_by(data["grpc"], "reserve_commit", c) or {}).get("ops_per_s"), 0) for c in concs]
            + [
                _ms((rc_top or {}).get("p50_us")),
                _ms((rc_top or {}).get("p99_us")),
                over,
                f"{vs:.2f}×" if vs is not None else "-",
            ]
        )
    lines += _table(header, table)
    lines += [
        "Overspend: units granted minus the limit, summed over the races (64 clients on one budget, "
        "Reserve then Commit until denied), counted the same way for every system from the replies, and checked "
        "against each server's own books.",
        "",
    ]
    lines += ["### Every baseline row (closed loop, µs)", ""]
    header = (
        ["system", "RPC", "conc.", "ops/s"]
        + [f"p{q:g}" for q in PERCENTILES]
        + ["n", "CPU srv/cli/db/other %", "srv CPU µs/op", "notes"]
    )
    table = []
    for name, data in base.items():
        for r in data["grpc"]:
            table.append(
                [name, r["label"], str(r["concurrency"]), _num(r["ops_per_s"], 0)]
                + _lat_cells(r)
                + [_num(r["count"]), _cpu3(r), _num(_cpu_per_op(r), 0), _error_notes(r)]
            )
    lines += _table(header, table, "llrr" + "r" * len(PERCENTILES) + "rrrl")
    lines += [
        "CPU: the baseline's gRPC server process / the load generator / the database (Postgres: the postmaster "
        "and its backends; Redis: redis-server) / everything else, in % of one core; all on the same CPUs.",
        "",
    ]
    return lines


def _profile_section(result: dict[str, Any]) -> list[str]:
    prof = result.get("profile")
    lines = ["## Where the time goes", ""]
    if prof:
        load = prof.get("load") or {}
        lines += [
            f"Sampled on the spendgate server for {prof['duration_s']:g} s while the load generator ran "
            f"Reserve+Commit at concurrency {load.get('concurrency')} ({_num(load.get('ops_per_s'), 0)} pairs/s, "
            f"server CPU {_num(load.get('server_cpu_pct'), 0)}% of one core).",
            "",
        ]
        py = prof.get("pyspy")
        if py and py.get("samples"):
            lines += [f"py-spy, {py['samples']:,} samples of the server's Python threads:", ""]
            lines += _table(["where", "% of samples"], [[c["what"], f"{c['pct']:.1f}"] for c in py["categories"]])
        elif prof.get("py-spy_error"):
            lines += [f"py-spy: not available ({prof['py-spy_error']}).", ""]
        dso = prof.get("perf_by_dso")
        if dso:
            threads = prof.get("perf_by_thread") or []
            lines += ["perf (on-CPU samples, whole process), by library and by thread:", ""]
            lines += _table(["library", "% of CPU samples"], [[f"`{d['name']}`", f"{d['pct']:.1f}"] for d in dso[:8]])
            if threads:
                lines += _table(
                    ["thread", "% of CPU samples"], [[f"`{t['name']}`", f"{t['pct']:.1f}"] for t in threads[:6]]
                )
            both = prof.get("perf_by_thread_and_dso") or []
            if both:
                lines += _table(
                    ["thread and library", "% of CPU samples"],
                    [
                        [f"`{t['name'].split()[0]}` in `{' '.join(t['name'].split()[1:])}`", f"{t['pct']:.1f}"]
                        for t in both[:8]
                    ],
                )
                lines += [
                    "perf samples by cpu-clock here (a VM without a PMU): time with interrupts off, such as a "
                    "context switch, is counted where interrupts come back on (`finish_task_switch`), so the "
                    "kernel share is mostly thread switches and the disk path, not computation. The `python` "
                    "thread name covers the event loop and grpc's poller thread.",
                    "",
                ]
        elif prof.get("perf_error"):
            lines += [f"perf: not available ({prof['perf_error']}).", ""]
    lines += [WHERE_TIME_GOES, ""]
    return lines


WHY_TARGETS = """\
Why the figures sit where they do (the numbers behind each reason are in the sections below):

- **Reserve p50 vs Ping p50, concurrency 1.** A Reserve replies only once its hold is durable: on top of one empty
  RPC it pays a round trip through the writer thread (hand-off, one LMDB transaction, wake the event loop) and the
  disk flushes (LMDB syncs the data, then the meta page). The h2load rows split the two: against `--durability
  relaxed` the round trip alone, against the default the round trip plus the flushes; `durable/fsync_each_op_1_thread`
  is the durable op without any RPC. With one request in flight nothing can share that flush, and no change in the
  Python front removes it from a durable reply. Our Python load generator adds its own cost to every sample at
  concurrency 1 (compare its Ping with h2load's), which is why its c=1 ratio differs from h2load's.
- **Reserve p50 vs Ping p50, concurrency 16 and 64.** Flushes are shared by whole batches (group commit), and latency
  is queueing: p50 ≈ in-flight requests / throughput, so the p50 ratio is about the inverse of the throughput ratio.
  That ratio is the server's CPU per Reserve against its CPU per Ping (the `srv CPU µs/req` columns): the difference
  is mostly the LMDB writer thread's work per op (pages, fsync syscalls, wake-ups), which shares the two CPUs with the
  event loop and the load generator. Group commit groups little here: the writer starts a transaction as soon as one
  op is queued, and with the event loop handing it ops one at a time, a batch held about 2.3 ops at 64 streams when
  measured by hand with the engine's own counters (`batches_total`, `ops_total`) on the 2-CPU machine. So a Reserve
  pays about half an fsync's CPU, and in a VM each flush is also a VM exit. Without the fsync (relaxed rows) the gap
  narrows to the check itself.
- **Reserve+Commit throughput vs Ping throughput.** A pair is two RPCs, each costing the server a little more than
  one Ping (grpc.aio's per-call work dominates; the engine call is about a microsecond). A pair therefore tops out
  near 0.5× the Ping rate on the same server, whatever the engine does; counted in RPCs it is the "(in RPCs)" figure.
  0.8× pairs per Ping would need each Reserve or Commit to cost 60% of an empty RPC: not possible on this stack; it is
  a target for a transport without grpc.aio's per-call cost, or for an API that carries a commit and the next
  reservation in one call.
- **vs Postgres.** The guarded UPDATE is correct (no overspend), but every change is a round trip to another process,
  a row lock and a WAL flush, and Postgres's own CPU competes for the same two cores; spendgate's check is an in-memory
  compare-and-swap whose flushes are batched. On one hot budget (the race) Postgres serializes on the row lock."""

RUST_NOTES = """\
`reserve_commit/*` time the engine's calls (counters, hold table, hand-off to the writer); the writer's durability is
awaited between samples, untimed. `durable/*` time the whole durable op: `fsync_each_op_1_thread` is one op in flight
(one LMDB transaction with its fsyncs per op); `group_commit_64_threads` is 64 threads each waiting for its own op (the
writer batches them: the sidecar's situation under load); `group_commit_1_thread_wait_every_1024` waits once per 1024
ops. `floor/*` is a bare `AtomicI64::fetch_add`."""

WHERE_TIME_GOES = """\
How to read it, and what was done about it:

- **The servicers' own code** (convert the request, call the engine, await durability, build the reply) is a couple
  of percent of the server's Python samples. Measured alone (no gRPC), a Reserve handler's CPU work is a few
  microseconds: about 0.8 µs in the engine, about 1 µs to build the reply, the rest in the error wrapper and the
  durability future. Removing all of it would not move a ratio: the transport stays as thin as it is, unchanged.
- **grpc.aio itself is most of the rest**: its Cython layer and C-core (HTTP/2 framing, per-call state, two asyncio
  tasks per RPC, a poller thread that hands completions to the event loop) and the interpreter running that
  machinery. py-spy cannot see inside Cython, so this shows as asyncio callbacks with nothing under them, plus the
  poller thread; perf shows it as libpython and cygrpc. A Ping pays exactly the same, which is why a Reserve costs
  about one Ping and a pair about two.
- **The LMDB writer thread** (`spendgate-write`) is the other large share, and most of it is kernel time: the fsyncs
  of each batch and the thread wake-ups around them (in this VM each disk flush is also a VM exit). This is the gap
  between a Reserve's and a Ping's server CPU, and the gap between the fsync and relaxed rows. It lives in the
  engine (rust/src), not in the front: with about 2 ops per batch under 64 streams (see the targets above), a writer
  that waits a little for more ops when many requests are in flight would need far fewer fsyncs for the same work.
- **Tried and measured, not kept**: running grpc.aio without `maximum_concurrent_rpcs` (its limiter adds an asyncio
  Condition and a task per RPC) and with `grpc.optimization_target=throughput`. Neither moved Ping or Reserve by more
  than the run-to-run noise of this shared machine, and the limit is part of the sidecar's configuration.
- **What cannot be fixed inside the Python front**: grpc.aio's per-call cost and the disk flush of a durable reply. The
  ways past them are architectural: a Rust gRPC front (tonic) over the same engine in the same process would take the
  interpreter and grpc.aio's thread hand-offs out of every call, and a call that carries a Commit and the next Reserve
  (or a batch of them) would share one RPC's cost among several changes."""
