"""The two PNGs: a latency CDF, and throughput against concurrency. Drawn from the result JSON (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One colour per system, the same in both plots; line style per RPC kind.
COLORS = {"spendgate": "#1f77b4", "postgres": "#d62728", "redis": "#2ca02c", "naive": "#ff7f0e", "ping": "#7f7f7f"}
NAMES = {
    "spendgate": "spendgate",
    "postgres": "Postgres baseline",
    "redis": "Redis baseline",
    "naive": "naive check-then-write",
}


def _cdf(ax: Any, samples_us: list[float], label: str, color: str, style: str = "-") -> None:
    if not samples_us:
        return
    xs = sorted(x / 1000.0 for x in samples_us)  # ms
    n = len(xs)
    # Plotting positions strictly inside (0, 1), for the logit axis: the tail (p99, p99.9) gets as much room as p50.
    ys = [(i + 0.5) / n for i in range(n)]
    ax.plot(xs, ys, style, color=color, label=label, linewidth=1.6)


def latency_cdf(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    grpc_rows = result.get("grpc", [])
    concurrencies = sorted({r["concurrency"] for r in grpc_rows})
    shown = [c for c in (1, 64) if c in concurrencies] or concurrencies[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(6.2 * len(shown), 5.2), squeeze=False)
    for ax, conc in zip(axes[0], shown, strict=True):
        by = {r["kind"]: r for r in grpc_rows if r["concurrency"] == conc}
        if "ping" in by:
            _cdf(ax, by["ping"]["samples_us"], "Ping (empty RPC, the floor)", COLORS["ping"], ":")
        if "reserve" in by:
            _cdf(ax, by["reserve"]["samples_us"], "spendgate Reserve", COLORS["spendgate"], "--")
        if "reserve_commit" in by:
            _cdf(ax, by["reserve_commit"]["samples_us"], "spendgate Reserve+Commit", COLORS["spendgate"])
        for name, base in result.get("baselines", {}).items():
            for r in base.get("grpc", []):
                if r["concurrency"] == conc and r["kind"] == "reserve_commit":
                    _cdf(ax, r["samples_us"], f"{NAMES[name]} Reserve+Commit", COLORS[name])
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale), measured in the client")
        ax.set_ylabel("percentile (logit scale)")
        ax.set_yscale("logit")
        ticks = [0.01, 0.1, 0.5, 0.9, 0.99, 0.999]
        ax.set_yticks(ticks)
        ax.set_yticklabels(["p1", "p10", "p50", "p90", "p99", "p99.9"])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0.005, 0.9995)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"closed loop, concurrency {conc}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle(_subtitle(result), fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_vs_concurrency(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.6), sharey=False)
    panels = (("reserve", "Reserve (ops/s)"), ("reserve_commit", "Reserve+Commit (pairs of RPCs per second)"))
    grpc_rows = result.get("grpc", [])
    for ax, (kind, title) in zip(axes, panels, strict=True):
        ping = sorted((r["concurrency"], r["ops_per_s"]) for r in grpc_rows if r["kind"] == "ping")
        if ping:
            ax.plot(*zip(*ping, strict=True), ":o", color=COLORS["ping"], label="Ping (empty RPC), same server")
        ours = sorted((r["concurrency"], r["ops_per_s"]) for r in grpc_rows if r["kind"] == kind)
        if ours:
            ax.plot(*zip(*ours, strict=True), "-o", color=COLORS["spendgate"], label="spendgate", linewidth=2)
        for name, base in result.get("baselines", {}).items():
            pts = sorted((r["concurrency"], r["ops_per_s"]) for r in base.get("grpc", []) if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts, strict=True), "-o", color=COLORS[name], label=NAMES[name])
        h2 = [r for r in result.get("h2load", []) if r.get("kind") in ("ping", kind) and not r.get("relaxed")]
        for r in h2:
            color = COLORS["ping"] if r["kind"] == "ping" else COLORS["spendgate"]
            ax.plot([r["concurrency"]], [r["ops_per_s"]], "x", color=color, markersize=9, mew=2)
        if h2:
            ax.plot([], [], "x", color="black", label="h2load (Ping grey, Reserve blue)")
        ax.set_xscale("log", base=2)
        concs = sorted({r["concurrency"] for r in grpc_rows}) or [1, 16, 64]
        ax.set_xticks(concs)
        ax.set_xticklabels([str(c) for c in concs])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("throughput (per second)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(_subtitle(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _subtitle(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"{m['date_utc'][:10]}, commit {m['git_commit']}{'+' if m.get('git_dirty') else ''}, {m['nproc']} CPUs "
        f"({m['cpu_model']}); load generator and servers share the machine; fsync durability everywhere"
    )


def render_all(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cdf = out_dir / "latency_cdf.png"
    tput = out_dir / "throughput_vs_concurrency.png"
    latency_cdf(result, cdf)
    throughput_vs_concurrency(result, tput)
    return [cdf, tput]
