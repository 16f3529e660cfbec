"""The sidecar's settings: one frozen dataclass, loaded from four sources.

Precedence, highest first: command-line flags > environment variables `SPENDGATE_<NAME>` > a TOML config file
(`--config FILE` or `SPENDGATE_CONFIG`) > the defaults below. Names end with their unit. The engine settings keep the
names and defaults of `spendgate._core.Engine` (tests/python/test_config.py checks them against _core.pyi).

This module checks only what a value must be to reach its consumer (its type, a choice, no negative numbers); the
engine checks its own ranges when it opens, so the rules live in one place.

Light on purpose (stdlib only): the CLI imports it for `--help`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from spendgate.display import parse_display_unit

ENV_PREFIX: Final[str] = "SPENDGATE_"
CONFIG_ENV_VAR: Final[str] = "SPENDGATE_CONFIG"
# SPENDGATE_* variables that are not settings but are read elsewhere. Any other SPENDGATE_* variable is an error, so
# that a misspelt setting (SPENDGATE_DATADIR) fails loudly instead of being ignored. Add a name here when you read one.
# SPENDGATE_TOKEN: the token the CLI's client commands send (spendgate.cli).
TOKEN_ENV_VAR: Final[str] = "SPENDGATE_TOKEN"
OTHER_ENV_VARS: Final[frozenset[str]] = frozenset({CONFIG_ENV_VAR, TOKEN_ENV_VAR})

DURABILITY_CHOICES: Final[tuple[str, ...]] = ("fsync", "relaxed")
LOG_LEVEL_CHOICES: Final[tuple[str, ...]] = ("debug", "info", "warning", "error")
PAYMENT_FAILED_ACTIONS: Final[tuple[str, ...]] = ("flag", "freeze")
INVOICE_SPIKE_ACTIONS: Final[tuple[str, ...]] = ("alert", "hold")
SETTLE_TRANSPORTS: Final[tuple[str, ...]] = ("v1", "v2")
PERIOD_CHOICES: Final[tuple[str, ...]] = ("month", "lifetime")
LOG_FORMAT_CHOICES: Final[tuple[str, ...]] = ("json", "text")
# A mapping setting (webhook_plan_limits), held as sorted (key, value) pairs so that Settings stays frozen and hashable.
PlanLimits = tuple[tuple[str, int], ...]
_BOOL_WORDS: Final[Mapping[str, bool]] = {
    "true": True, "1": True, "yes": True, "on": True,
    "false": False, "0": False, "no": False, "off": False,
}  # fmt: skip


class ConfigError(ValueError):
    """A setting is unknown or has a bad value. The message names the setting and where the value came from.

    `setting`: the setting at fault, when one is (so that a caller that knows where its value came from can say so).
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


def _setting(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: int = 0,
    env: str | None = None,
    optional: bool = False,
    secret: bool = False,
) -> Any:
    """A dataclass field with its one-line doc, its allowed choices (for str) and its minimum (for int).

    env: the environment variable, when it is not SPENDGATE_<NAME> (Stripe's own names: STRIPE_API_KEY, ...).
    optional: a str setting that may be empty (empty means off or not set).
    secret: never shown (not in repr, not as a default in the table); prefer the environment variable over the flag.
    """
    assert doc and "\n" not in doc, "a setting's doc is one line"
    metadata = {"doc": doc, "choices": choices, "minimum": minimum, "env": env, "optional": optional, "secret": secret}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    # The gRPC server.
    listen: str = _setting("127.0.0.1:50051", "Address to serve gRPC on, HOST:PORT; port 0 picks a free port (logged).")
    # The engine: names and defaults as in spendgate._core.Engine.
    data_dir: str = _setting(
        "./spendgate-data", "Directory of the LMDB environment, created if missing; one sidecar process per directory."
    )
    map_size_mb: int = _setting(
        1024, "LMDB map size to start with, in MiB; the sidecar grows it by itself up to map_max_mb.", minimum=8
    )
    map_max_mb: int = _setting(
        0,
        "The most the LMDB map may grow to, in MiB; 0: whatever the disk can spare beyond disk_reserve_mb.",
        minimum=0,
    )
    disk_reserve_mb: int = _setting(
        256, "Disk space (MiB) the data never takes: the map stops growing this far from a full disk.", minimum=0
    )
    ledger_retention_days: int = _setting(
        180,
        "Settled ledger entries of closed periods move from LMDB to the compressed archive (archive/ in the data dir) "
        "after this many days; 180 covers the card networks' 120-day dispute window.",
        minimum=0,
    )
    backup_dir: str = _setting(
        "",
        "When set, Admin.Backup writes only into new or empty directories under this one (symlinks resolved); empty: "
        "any absolute path the sidecar can write.",
        optional=True,
    )
    durability: str = _setting(
        "fsync",
        "`fsync`: a change is acknowledged once fsynced (survives power loss); `relaxed`: no fsync (survives a crash).",
        choices=DURABILITY_CHOICES,
    )
    default_ttl_ms: int = _setting(60_000, "Hold lifetime when a Reserve gives no ttl_ms.")
    max_ttl_ms: int = _setting(3_600_000, "Longest hold lifetime a Reserve may ask for.")
    max_holds_per_budget: int = _setting(
        10_000, "Open holds one budget may have; past it Reserve is denied with TOO_MANY_HOLDS."
    )
    max_active_holds: int = _setting(1_000_000, "Open holds across all budgets; past it Reserve fails.")
    max_budgets: int = _setting(1_000_000, "Budgets the sidecar may hold; past it creating a budget fails.")
    write_queue_capacity: int = _setting(65_536, "Changes that may wait for the LMDB writer at once.", minimum=1)
    reap_interval_ms: int = _setting(100, "How often the engine expires holds whose TTL has passed.", minimum=1)
    resolved_retention_ms: int = _setting(
        7 * 86_400_000, "How long ended holds are kept so that retried calls replay instead of failing."
    )
    prune_interval_ms: int = _setting(
        60_000,
        "How often the engine drops ended holds past resolved_retention_ms and moves settled ledger entries past "
        "ledger_retention_days to the archive (a pass is bounded; a backlog runs again at once).",
        minimum=1,
    )
    max_outbox_entries: int = _setting(
        10_000_000,
        "Committed usages waiting for settlement to Stripe; at the bound new Reserves fail (commits still go in).",
        minimum=1,
    )
    default_period: str = _setting(
        "month",
        "Period of a budget created without one: `month` (the calendar month in UTC) or `lifetime` (never resets).",
        choices=PERIOD_CHOICES,
    )
    breaker_multiplier: int = _setting(
        10, "Circuit breaker: freeze a budget whose last-hour usage exceeds this many times its typical hour; 0: off."
    )
    breaker_recent_ms: int = _setting(
        3_600_000, 'Circuit breaker: the recent window ("the last hour"), a multiple of 12.', minimum=1
    )
    breaker_window_ms: int = _setting(
        86_400_000, "Circuit breaker: the trailing window whose active hours make the typical hour.", minimum=1
    )
    breaker_min_units: int = _setting(
        0,
        "Circuit breaker: never trip below this many units in the recent window (and, without history, trip above it).",
    )
    max_clock_step_ms: int = _setting(
        1_000,
        "A wall clock further than this from the monotonic clock has stepped: alerted (clock_step) and counted; "
        "periods and the breaker ignore the step until it has held for clock_step_confirm_ms. Holds never see the "
        "wall clock.",
        minimum=1,
    )
    clock_step_confirm_ms: int = _setting(
        900_000,
        "How long (monotonic) a wall-clock step must hold before periods, the breaker and timestamps follow it; one "
        "undone sooner never counts.",
        minimum=1,
    )
    # The gRPC server, again.
    max_message_bytes: int = _setting(4 * 1024 * 1024, "Largest gRPC message received or sent.", minimum=1)
    max_concurrent_rpcs: int = _setting(10_000, "RPCs in flight at once; more get RESOURCE_EXHAUSTED.", minimum=1)
    shutdown_grace_ms: int = _setting(5_000, "On SIGTERM or SIGINT, how long in-flight RPCs may take to finish.")
    reflection: bool = _setting(True, "Serve gRPC server reflection (for grpcurl and similar tools).")
    log_level: str = _setting("info", "Log level: debug, info, warning or error.", choices=LOG_LEVEL_CHOICES)
    # Stripe, shared by the settler, `spendgate reconcile` and the webhook handlers. Stripe's own variable names.
    stripe_api_key: str = _setting(
        "",
        "Stripe secret or restricted (`rk_`) key; prefer the environment variable. Empty: nothing is sent to Stripe.",
        env="STRIPE_API_KEY",
        optional=True,
        secret=True,
    )
    stripe_api_base: str = _setting(
        "",
        "When set, every Stripe base address (`api` and `meter_events`) points here (fakes and tests).",
        env="STRIPE_API_BASE",
        optional=True,
    )
    settle_event_name: str = _setting("spendgate_usage", "Event name of the Stripe meter that committed units go to.")
    settle_token_event_name: str = _setting(
        "token-billing-tokens",
        "Event name of the Stripe token-billing meter (dimensions model, token_type) that commits priced from tokens "
        "go to, one event per token type; empty: they go to settle_event_name as units.",
        optional=True,
    )
    # The settler (spendgate.settle): how the outbox drains to Stripe Billing Meters.
    settle_transport: str = _setting(
        "v1",
        "Stripe API for meter events: `v1` (one event a request) or `v2` (the meter event stream, <= 100 a request).",
        choices=SETTLE_TRANSPORTS,
    )
    settle_batch_size: int = _setting(
        100, "Events per v2 stream request (1..=100); a round reads batch size x concurrency entries.", minimum=1
    )
    settle_concurrency: int = _setting(4, "Stripe calls in flight at once (the settler's threads).", minimum=1)
    settle_interval_ms: int = _setting(500, "How often the settler looks at an empty outbox.", minimum=1)
    settle_aggregate_window_ms: int = _setting(
        0, "Pre-aggregation: one event per Stripe customer per window of this length; 0: one event per commit."
    )
    settle_auto_aggregate: bool = _setting(
        True,
        "With settle_aggregate_window_ms 0: once a backlog builds in the outbox (a round's worth of entries), send "
        "one event per Stripe customer (and model) per second until it is drained; off: always one event per commit "
        "(then a restored backup's unsent entries can be resent under their own identifiers).",
    )
    settle_max_attempts: int = _setting(
        5, "Tries of one Stripe call (429, 5xx, connection errors) before it waits for a later round.", minimum=1
    )
    settle_backoff_base_ms: int = _setting(100, "First retry delay (exponential backoff, full jitter).", minimum=1)
    settle_backoff_max_ms: int = _setting(
        30_000, "Longest retry delay, also between rounds while Stripe keeps failing.", minimum=1
    )
    settle_request_timeout_ms: int = _setting(30_000, "Timeout of one HTTP request to Stripe.", minimum=1)
    # Stripe webhooks: an HTTP server in the same process, on its own port.
    webhook_listen: str = _setting(
        "",
        "HOST:PORT to serve Stripe webhooks on (POST /stripe/webhook); a bare PORT binds 127.0.0.1; empty: off.",
        optional=True,
    )
    webhook_secret: str = _setting(
        "",
        "Signing secret of the webhook endpoint (`whsec_...`); several comma-separated; required with webhook_listen.",
        env="STRIPE_WEBHOOK_SECRET",
        optional=True,
        secret=True,
    )
    webhook_plan_limits: PlanLimits = _setting(
        (), "Budget limit per Stripe plan, by price id or lookup_key: a TOML table, or a JSON object in env and flag."
    )
    # Pricing (spendgate.policy): tokens to budget units.
    price_table: str = _setting(
        "",
        "TOML price file overriding the bundled prices (spendgate/policy/default_prices.toml); empty: bundled only.",
        optional=True,
    )
    price_reload_interval_ms: int = _setting(
        1_000, "How often the price file is checked for changes (it also reloads on SIGHUP); 0: only on SIGHUP."
    )
    webhook_payment_failed_action: str = _setting(
        "flag",
        "On invoice.payment_failed: `freeze` the budget (its invoice.paid unfreezes it) or `flag` it (log and count).",
        choices=PAYMENT_FAILED_ACTIONS,
    )
    # The invoice-spike guard (spendgate.webhooks.invoices), on Stripe's invoice.created.
    invoice_spike_percent: int = _setting(
        50,
        "invoice.created: raise an invoice_spike alert when the draft's total is more than this many percent above "
        "the customer's previous invoice's (any draft above a previous 0 is a spike).",
    )
    invoice_spike_action: str = _setting(
        "alert",
        "On an invoice spike: `alert` only, or `hold` the draft too (auto_advance false, so Stripe does not "
        "finalize it) until `spendgate invoices release INVOICE`.",
        choices=INVOICE_SPIKE_ACTIONS,
    )
    # Reconciliation on a schedule (spendgate.settle.scheduled): the ledger against Stripe's meter event summaries.
    reconcile_interval_ms: int = _setting(
        3_600_000,
        "How often the sidecar reconciles each active customer's current period with Stripe (needs "
        "STRIPE_API_KEY); 0: never.",
    )
    reconcile_tolerance_percent: int = _setting(
        1,
        "Scheduled reconcile: a customer whose Stripe total differs from the settled ledger by more than this "
        "percent (beyond what is in flight or not yet visible) raises a reconcile_divergence alert.",
    )
    reconcile_max_customers: int = _setting(
        1_000,
        "Scheduled reconcile: Stripe customers compared per run; the next run goes on where one stopped.",
        minimum=1,
    )
    reconcile_max_requests_per_second: int = _setting(
        5,
        "Scheduled reconcile: Stripe API calls per second at most (Stripe's read rate limit is shared with the "
        "settler and everything else using the key).",
        minimum=1,
    )
    reconcile_visibility_allowance_ms: int = _setting(
        600_000,
        "Scheduled reconcile: usage Stripe acknowledged this recently may be missing from its summaries "
        "(Stripe aggregates asynchronously) without counting as a divergence.",
    )

    # Operating it: the HTTP port, logs, security and per-connection limits (README "Operating it").
    http_listen: str = _setting(
        "",
        "HOST:PORT to serve /metrics and the operator page on; a bare PORT binds 127.0.0.1; empty: off.",
        optional=True,
    )
    metrics_require_token: bool = _setting(
        False,
        "/metrics needs the operator page's credentials too (a client certificate under mTLS, an admin token under "
        "tokens); default: open, it holds no customer data.",
    )
    http_operator_page: bool = _setting(
        True, "Serve the operator page on http_listen; off: only /metrics (and webhooks when they share the port)."
    )
    http_allowed_hosts: str = _setting(
        "",
        "Without tokens, Host names (or addresses) besides loopback ones the operator page answers, comma-separated; "
        "others get 421 (DNS rebinding).",
        optional=True,
    )
    http_session_ttl_ms: int = _setting(
        12 * 3_600_000,
        "How long an operator page sign-in lasts (the session ends then, or at sign-out).",
        minimum=1_000,
    )
    http_max_sessions: int = _setting(
        1_000, "Operator page sessions kept at once; a sign-in past it ends the oldest session.", minimum=1
    )
    http_frame_ancestors: str = _setting(
        "'none'",
        "CSP frame-ancestors of the HTTP pages: the origins that may frame them, space-separated (e.g. `'self' "
        "https://app.example.com`); `'none'`: no one.",
    )
    # The customer usage page (README "The usage page"): served on http_listen at signed links.
    usage_link_secret_file: str = _setting(
        "",
        "File holding the key that signs usage-page links (>= 32 bytes, e.g. `openssl rand -hex 32`); empty: the "
        "sidecar makes `usage-link.key` (0600) in data_dir. Replacing it ends every link.",
        optional=True,
    )
    usage_link_base_url: str = _setting(
        "",
        "Where customers reach http_listen, e.g. `https://usage.example.com` (a proxy in front); usage links start "
        "with it. Empty: the HTTP port's own address.",
        optional=True,
    )
    usage_page_frame_ancestors: str = _setting(
        "'none'",
        "CSP frame-ancestors of the usage page: the app origins that may frame it, space-separated (e.g. "
        "`https://app.example.com`); `'none'`: no one.",
    )
    display_unit: str = _setting(
        "units",
        "How the pages show amounts: `units`, `usd_micros`/`usd_cents` (any ISO code: `eur_cents`), or `NAME` or "
        "`NAME/SCALE` (SCALE units make one NAME, a power of ten, e.g. `credits/1000`).",
    )
    log_format: str = _setting(
        "json",
        "`json`: one JSON object a line (ts, level, logger, msg, request_id, ...); `text`: for people.",
        choices=LOG_FORMAT_CHOICES,
    )
    app_tokens: str = _setting(
        "",
        "Bearer tokens that may call Budget, comma-separated; prefer the variable or app_tokens_file.",
        optional=True,
        secret=True,
    )
    app_tokens_file: str = _setting(
        "",
        "File of app tokens (one a line or comma-separated), so that they never sit in a process list.",
        optional=True,
    )
    admin_tokens: str = _setting(
        "",
        "Bearer tokens that may call Budget and Admin (and see the operator page), comma-separated.",
        optional=True,
        secret=True,
    )
    admin_tokens_file: str = _setting("", "File of admin tokens (one a line or comma-separated).", optional=True)
    tls_cert_file: str = _setting(
        "",
        "PEM certificate chain of the server: gRPC (and the HTTP port) serve TLS; needs tls_key_file.",
        optional=True,
    )
    tls_key_file: str = _setting("", "PEM private key of tls_cert_file.", optional=True)
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle: when set, every gRPC client must present a certificate it signed (mTLS).", optional=True
    )
    allow_insecure_non_loopback: bool = _setting(
        False, "Serve on a non-loopback address without TLS or without client authentication (tokens or mTLS)."
    )
    max_concurrent_streams: int = _setting(
        1_000,
        "RPCs one connection may have in flight (HTTP/2 MAX_CONCURRENT_STREAMS); more wait on the client.",
        minimum=1,
    )
    min_ping_interval_ms: int = _setting(
        10_000,
        "Shortest interval between a client's keepalive pings; a connection that pings faster is closed.",
    )
    max_connection_idle_ms: int = _setting(
        0, "Close a connection that had no RPC for this long (the client reconnects when it needs to); 0: never."
    )
    max_connection_age_ms: int = _setting(
        0, "Close a connection this old (after max_connection_age_grace_ms for its RPCs), to rebalance; 0: never."
    )
    max_connection_age_grace_ms: int = _setting(
        5_000, "How long RPCs of a connection closed for its age may take to finish."
    )
    # Alerts (spendgate.server.alerts): the Budget.WatchAlerts streams, and the alert webhook.
    alert_watch_queue_capacity: int = _setting(
        1_000,
        "Alerts one WatchAlerts stream may have waiting; one further behind is ended (resumably).",
        minimum=1,
    )
    alert_max_watchers: int = _setting(100, "WatchAlerts streams open at once; more get RESOURCE_EXHAUSTED.", minimum=1)
    alert_max_watchers_per_client: int = _setting(
        25,
        "WatchAlerts streams one client may have open (by token; without tokens by client certificate, else by "
        "address); the smaller of it and alert_max_watchers applies; more get RESOURCE_EXHAUSTED.",
        minimum=1,
    )
    alert_webhook_url: str = _setting(
        "", "http(s) URL to POST every alert to, signed, in order, at least once; empty: off.", optional=True
    )
    alert_webhook_secret: str = _setting(
        "",
        "Secret that signs the alert webhook (Spendgate-Signature header); required with alert_webhook_url.",
        optional=True,
        secret=True,
    )
    alert_webhook_timeout_ms: int = _setting(10_000, "Timeout of one alert webhook request, all of it.", minimum=1)
    alert_webhook_connect_timeout_ms: int = _setting(
        5_000, "Timeout of connecting to the alert webhook receiver.", minimum=1
    )
    alert_webhook_max_attempts: int = _setting(
        8,
        "Tries of one alert (5xx, 429, connection errors) before an error is logged; it is retried, never skipped.",
        minimum=1,
    )
    alert_webhook_backoff_base_ms: int = _setting(
        500, "First alert webhook retry delay (exponential backoff, full jitter).", minimum=1
    )
    alert_webhook_backoff_max_ms: int = _setting(
        60_000, "Longest alert webhook retry delay (also the cap on a receiver's Retry-After).", minimum=1
    )

    # The OpenAI- and Anthropic-compatible HTTP proxy (spendgate.proxy): zero-code adoption, on the same loop.
    proxy_listen: str = _setting(
        "",
        "HOST:PORT to serve the OpenAI- and Anthropic-compatible proxy on (/v1/chat/completions, /v1/responses, "
        "/v1/messages); a bare PORT binds 127.0.0.1; empty: off.",
        optional=True,
    )
    proxy_openai_base_url: str = _setting(
        "https://api.openai.com/v1", "Upstream base address of the proxy's OpenAI routes (the SDK's base_url form)."
    )
    proxy_anthropic_base_url: str = _setting(
        "https://api.anthropic.com", "Upstream base address of the proxy's Anthropic route (the SDK's base_url form)."
    )
    proxy_openai_api_key_file: str = _setting(
        "",
        "File holding the OpenAI API key the proxy sends upstream for calls made with a spendgate virtual key.",
        optional=True,
    )
    proxy_anthropic_api_key_file: str = _setting(
        "",
        "File holding the Anthropic API key the proxy sends upstream for calls made with a spendgate virtual key.",
        optional=True,
    )
    proxy_customer_id_from_body: bool = _setting(
        False,
        "Proxy: without a virtual key or x-spendgate-customer-id, take the customer from the body (OpenAI "
        "safety_identifier or user, Anthropic metadata.user_id), for existing budgets only.",
    )
    proxy_max_body_bytes: int = _setting(
        32 * 1024 * 1024,
        "Largest request body the proxy accepts (it reads it whole to bound the call); more: 413.",
        minimum=1,
    )
    proxy_hold_ttl_ms: int = _setting(
        0,
        "Hold lifetime of a proxied call, and the longest one may run (then its whole hold is committed); at most "
        "max_ttl_ms; 0: max_ttl_ms.",
    )
    proxy_upstream_connect_timeout_ms: int = _setting(
        10_000, "Proxy: timeout of connecting to the upstream provider.", minimum=1
    )
    proxy_upstream_read_timeout_ms: int = _setting(
        600_000,
        "Proxy: longest wait for the next bytes from upstream (time to first token of long reasoning too).",
        minimum=1,
    )
    proxy_max_upstream_connections: int = _setting(
        1_000, "Proxy: upstream connections open at once (each stream holds one); more calls wait for one.", minimum=1
    )
    proxy_drain_timeout_ms: int = _setting(
        600_000,
        "Proxy: after a client leaves mid-stream, how long upstream is still read for the final usage; past "
        "it the whole hold is committed.",
        minimum=1,
    )
    proxy_max_drains: int = _setting(
        256,
        "Proxy: streams read on after their client left, at once; past it the whole hold is committed at once.",
        minimum=1,
    )

    def __post_init__(self) -> None:
        # Every way in (load_settings, the CLI, tests) ends here: a Settings that exists is valid.
        for spec in dataclasses.fields(self):
            if isinstance(spec.default, tuple):  # a table setting may be given as a mapping
                object.__setattr__(self, spec.name, _pairs(getattr(self, spec.name)))
        for spec in dataclasses.fields(self):
            problem = _problem(spec, getattr(self, spec.name))
            if problem is not None:
                raise ConfigError(f"setting {spec.name!r}: {problem}", spec.name)
        for name, problem in _combination_problems(self):
            raise ConfigError(f"setting {name!r}: {problem}", name)

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of spendgate._core.Engine(data_dir, **kwargs)."""
        return {name: getattr(self, name) for name in ENGINE_SETTINGS}


# Settings passed to the engine as keyword arguments (data_dir is its positional argument).
ENGINE_SETTINGS: Final[tuple[str, ...]] = (
    "map_size_mb",
    "map_max_mb",
    "disk_reserve_mb",
    "ledger_retention_days",
    "durability",
    "default_ttl_ms",
    "max_ttl_ms",
    "max_holds_per_budget",
    "max_active_holds",
    "max_budgets",
    "write_queue_capacity",
    "reap_interval_ms",
    "resolved_retention_ms",
    "prune_interval_ms",
    "max_outbox_entries",
    "default_period",
    "breaker_multiplier",
    "breaker_recent_ms",
    "breaker_window_ms",
    "breaker_min_units",
    "max_clock_step_ms",
    "clock_step_confirm_ms",
)

FIELDS: Final[Mapping[str, dataclasses.Field[Any]]] = {f.name: f for f in dataclasses.fields(Settings)}
assert set(ENGINE_SETTINGS) <= set(FIELDS)


def env_var(name: str) -> str:
    custom: str | None = FIELDS[name].metadata["env"] if name in FIELDS else None
    return custom or ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def doc(name: str) -> str:
    return str(FIELDS[name].metadata["doc"])


def _problem(spec: dataclasses.Field[Any], value: object) -> str | None:
    """Why `value` is not valid for the setting, or None. Typed values only: text is parsed by parse_text first."""
    kind = type(spec.default)
    # bool is a subclass of int: `map_size_mb = true` must not pass as 1.
    if type(value) is not kind:
        return f"expected {_type_word(kind)}, got {type(value).__name__} {value!r}"
    choices: tuple[str, ...] = spec.metadata["choices"]
    if choices and value not in choices:
        return f"expected one of {', '.join(choices)}, got {value!r}"
    minimum: int = spec.metadata["minimum"]
    if kind is int and value < minimum:  # type: ignore[operator]
        return f"expected an integer >= {minimum}, got {value!r}"
    if kind is str and not value and not spec.metadata["optional"]:
        return "expected a non-empty string"
    if kind is tuple:
        assert isinstance(value, tuple)
        for pair in value:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                return f"expected pairs of a non-empty key and a value, got {pair!r}"
            if type(pair[1]) is not int or pair[1] < 0:
                return f"expected an integer >= 0 for {pair[0]!r}, got {pair[1]!r}"
    return None


def _alert_webhook_problems(settings: Settings) -> list[tuple[str, str]]:
    """What is wrong with the alert webhook's settings, when alert_webhook_url is set."""
    problems = []
    scheme, _, rest = settings.alert_webhook_url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        url = settings.alert_webhook_url
        problems.append(("alert_webhook_url", f"expected an http:// or https:// URL, got {url!r}"))
    if not settings.alert_webhook_secret:
        problems.append(
            (
                "alert_webhook_secret",
                "alert_webhook_url needs a secret to sign with: set "
                "SPENDGATE_ALERT_WEBHOOK_SECRET (openssl rand -hex 32), the receiver "
                "verifies with the same one",
            )
        )
    if settings.alert_webhook_backoff_max_ms < settings.alert_webhook_backoff_base_ms:
        problems.append(("alert_webhook_backoff_max_ms", "must be >= alert_webhook_backoff_base_ms"))
    return problems


def _combination_problems(settings: Settings) -> list[tuple[str, str]]:
    """(setting, problem) for settings that only work together: TLS needs a certificate and its key."""
    problems = []
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        missing = "tls_key_file" if settings.tls_cert_file else "tls_cert_file"
        given = "tls_cert_file" if settings.tls_cert_file else "tls_key_file"
        problems.append((given, f"TLS needs both tls_cert_file and tls_key_file: set {missing} too"))
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        problems.append(
            ("tls_client_ca_file", "mTLS needs the server's own certificate: set tls_cert_file and tls_key_file too")
        )
    if settings.alert_webhook_url:
        problems.extend(_alert_webhook_problems(settings))
    if settings.proxy_listen and settings.proxy_hold_ttl_ms > settings.max_ttl_ms:
        problems.append(
            (
                "proxy_hold_ttl_ms",
                f"{settings.proxy_hold_ttl_ms} is over max_ttl_ms "
                f"({settings.max_ttl_ms}): lower it or raise max_ttl_ms",
            )
        )
    for name in ("proxy_openai_base_url", "proxy_anthropic_base_url"):
        scheme, _, rest = getattr(settings, name).partition("://")
        if scheme.lower() not in ("http", "https") or not rest.strip("/"):
            problems.append((name, f"expected an http:// or https:// URL, got {getattr(settings, name)!r}"))
    problems.extend(_http_problems(settings))
    return problems


# A Host name or address in http_allowed_hosts: DNS labels, an IPv4 address, or an IPv6 address (brackets optional).
_HOST_NAME: Final[re.Pattern[str]] = re.compile(
    r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})?\.)*[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})?\.?$"
)
# Characters that would end a CSP directive or a header value early.
_CSP_BREAKERS: Final[tuple[str, ...]] = (";", ",", "\r", "\n")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """http_allowed_hosts as lower-case names without brackets or a trailing dot."""
    parts = (part.strip() for part in settings.http_allowed_hosts.split(","))
    return frozenset(part.strip("[]").rstrip(".").lower() for part in parts if part)


def _http_problems(settings: Settings) -> list[tuple[str, str]]:
    problems = []
    for part in (part.strip() for part in settings.http_allowed_hosts.split(",")):
        if part and not (_HOST_NAME.match(part) or (":" in part and _is_ipv6(part.strip("[]")))):
            why = (
                f"{part!r} is not a host name or an IP address: list names such as `spendgate.internal` or "
                "addresses, comma-separated, without scheme, port or path"
            )
            problems.append(("http_allowed_hosts", why))
    for name in ("http_frame_ancestors", "usage_page_frame_ancestors"):
        ancestors = getattr(settings, name)
        if not ancestors.strip() or any(breaker in ancestors for breaker in _CSP_BREAKERS):
            why = (
                f"expected CSP sources separated by spaces (such as `'self' https://app.example.com`, or "
                f"`'none'`), without ';' or ',', got {ancestors!r}"
            )
            problems.append((name, why))
    problems.extend(_usage_page_problems(settings))
    return problems


def _usage_page_problems(settings: Settings) -> list[tuple[str, str]]:
    problems = []
    try:
        parse_display_unit(settings.display_unit)
    except ValueError as error:
        problems.append(("display_unit", str(error)))
    base = settings.usage_link_base_url
    scheme, _, rest = base.partition("://")
    if base and (scheme.lower() not in ("http", "https") or not rest.strip("/") or "?" in base or "#" in base):
        why = (
            "expected an http:// or https:// URL without query or fragment (such as https://usage.example.com), "
            f"got {base!r}"
        )
        problems.append(("usage_link_base_url", why))
    return problems


def _type_word(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", tuple: "a table"}[kind]


def _pairs(value: object) -> object:
    """A table setting's value as sorted (key, value) pairs; anything that is not a mapping is returned unchanged, for
    _problem to reject."""
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return value


def _kind(name: str) -> type:
    return type(FIELDS[name].default)


def parse_text(name: str, text: str) -> Any:
    """The typed value of a setting given as text (an environment variable or a command-line flag).

    Raises ValueError saying what was expected; the caller adds where the text came from.
    """
    kind = _kind(name)
    if kind is bool:
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise ValueError(f"expected a boolean (true/false, 1/0, yes/no, on/off), got {text!r}")
        value: Any = _BOOL_WORDS[word]
    elif kind is int:
        try:
            value = int(text.strip(), 10)  # also accepts 1_000_000
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    elif kind is tuple:
        try:
            document = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(
                f'expected a JSON object such as {{"price_pro": 5000000}}, got {text!r}: {error}'
            ) from None
        if not isinstance(document, dict):
            raise ValueError(f'expected a JSON object such as {{"price_pro": 5000000}}, got {text!r}')
        value = _pairs(document)
    else:
        value = text
    problem = _problem(FIELDS[name], value)
    if problem is not None:
        raise ValueError(problem)
    return value


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Settings from the four sources. `flags` holds typed values by setting name (None: not given); `env` defaults to
    os.environ; `config_file` (--config) wins over SPENDGATE_CONFIG. Raises ConfigError."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # setting -> where its value came from, for errors found only once all are in
    path = config_file if config_file is not None else env.get(CONFIG_ENV_VAR) or None
    if path is not None:
        text, document = _read_toml(Path(path))
        values.update(read_config_file(Path(path)))
        where.update({key: f"config file {path}{_line_of(text, key)}" for key in document})
    from_env = read_env(env)
    values.update(from_env)
    where.update({name: f"environment variable {env_var(name)}" for name in from_env})
    for name, value in (flags or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r} given as a flag")
        if value is not None:
            values[name] = value
            where[name] = f"flag {flag(name)}"
    try:
        return Settings(**values)
    except ConfigError as error:
        if error.setting is None or error.setting not in where:
            raise
        raise ConfigError(f"{where[error.setting]}: {error}", error.setting) from None


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as SPENDGATE_<NAME> variables (and the few with Stripe's own names, such as STRIPE_API_KEY).
    Any other SPENDGATE_* variable is an error."""
    by_var = {env_var(name): name for name in FIELDS}
    values: dict[str, Any] = {}
    for var in sorted(env):
        if var in OTHER_ENV_VARS or not (var.startswith(ENV_PREFIX) or var in by_var):
            continue
        name = by_var.get(var)
        if name is None:
            known = ", ".join(sorted([*by_var, *OTHER_ENV_VARS]))
            raise ConfigError(f"environment variable {var}: unknown setting; known variables: {known}")
        try:
            values[name] = parse_text(name, env[var])
        except ValueError as error:
            raise ConfigError(f"environment variable {var}: {error}") from None
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file: top-level `name = value` pairs, TOML-typed (numbers unquoted). Raises ConfigError
    for the first problem (config_file_problems lists them all)."""
    values, problems = config_file_problems(path)
    if problems:
        raise ConfigError(problems[0])
    return values


def config_file_problems(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(the valid settings of a TOML file, every problem in it), each problem naming the file and the line. Checks
    the file alone: settings that only work together (TLS) are checked with the file's other settings and defaults."""
    text, document = _read_toml(path)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in document.items():
        where = f"config file {path}{_line_of(text, key)}"
        if key not in FIELDS:
            problems.append(f"{where}: unknown setting {key!r}; known settings: {', '.join(FIELDS)}")
            continue
        if _kind(key) is tuple and isinstance(value, Mapping):
            problem = _table_problem(path, text, key, value)
            value = _pairs(value)
        else:
            problem = _problem(FIELDS[key], value)
            problem = problem and f"{where}: setting {key!r}: {problem}"
        if problem is not None:
            problems.append(problem)
            continue
        values[key] = value
    if not problems:
        try:
            Settings(**values)
        except ConfigError as error:  # a combination: point at the line of the setting it names
            line = _line_of(text, error.setting) if error.setting in document else ""
            problems.append(f"config file {path}{line}: {error}")
    return values, problems


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path}: not UTF-8 text: {error}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: not valid TOML: {error}") from None


def _table_problem(path: Path, text: str, key: str, table: Mapping[str, Any]) -> str | None:
    """The first bad entry of a table setting, pointing at its own line inside the table."""
    for inner, value in table.items():
        problem = _problem(FIELDS[key], ((inner, value),))
        if problem is not None:
            return f"config file {path}{_line_of(text, inner, table=key)}: setting {key!r}: {problem}"
    return None


def _line_of(text: str, key: str | None, *, table: str | None = None) -> str:
    """' line N' where `key = ...` (or a [key] table) is in the TOML text, inside the [table] section when given; ''
    if it cannot be found."""
    if key is None:
        return ""
    quoted = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*=|^\s*\[+\s*{quoted}\s*[\].]""")
    header = re.compile(r"^\s*\[")
    lines = text.splitlines()
    first = 0
    if table is not None:
        table_line = _line_of(text, table)
        if not table_line:
            return ""
        first = int(table_line.split()[-1])  # the line after the [table] header
    for number, line in enumerate(lines[first:], start=first + 1):
        if table is not None and header.match(line):
            break  # the next table: the key was not in this one
        if pattern.match(line):
            return f" line {number}"
    return ""


def settings_table_markdown() -> str:
    """The settings as a Markdown table (for the README)."""
    rows = ["| Setting | Flag | Environment variable | Default | Meaning |", "| --- | --- | --- | --- | --- |"]
    for name, spec in FIELDS.items():
        default = spec.default
        shown = (
            str(default).lower()
            if isinstance(default, bool)
            else f"{default:_}"
            if isinstance(default, int)
            else default
        )
        if isinstance(default, tuple):
            shown = json.dumps(dict(default))
        elif default == "":
            shown = '""'
        flags = f"`{flag(name)}`, `--no-{flag(name)[2:]}`" if isinstance(default, bool) else f"`{flag(name)}`"
        rows.append(f"| `{name}` | {flags} | `{env_var(name)}` | `{shown}` | {doc(name)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table_markdown(), end="")
