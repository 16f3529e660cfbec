"""The `spendgate` command line.

    spendgate serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR] ...   run the sidecar (a flag per setting)
    spendgate budget set CUSTOMER --limit N [--stripe-customer-id ID]            create a budget or change its limit
    spendgate budget show CUSTOMER                                               print a budget's counters
    spendgate budget grant CUSTOMER AMOUNT --key K [--reason R]                  add credits, once per key
    spendgate budget list [--prefix P] [--limit N]                               list budgets, one a line
    spendgate settle [FLAGS] [--follow]                  drain the outbox to Stripe while the sidecar is stopped
    spendgate settle status                              settlement status of a running sidecar
    spendgate deadletter list | requeue SEQ... | requeue --all     dead letters of a running sidecar
    spendgate reconcile [--period YYYY-MM | --start DATE [--end DATE]] [--fix ...]   the ledger against Stripe
    spendgate invoices release INVOICE                   let Stripe finalize a draft the invoice-spike guard held
    spendgate backup DEST | restore SRC --data-dir DIR [--force] | inspect [SECTION]   data care (spendgate.datacare)
    spendgate ledger export CUSTOMER [--period P] --format csv|jsonl [--output FILE]   the audit trail of a period
    spendgate check-config FILE                          validate a TOML config file offline (exit 2: problems)

Only argparse and spendgate.config are imported up front; grpc, the engine and the generated code are imported inside
the commands, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Final

from spendgate import config

PROG: Final[str] = "spendgate"
# How long a `budget` command waits for the sidecar's reply. Generous: an fsync'd write is milliseconds.
RPC_TIMEOUT_S: Final[float] = 10.0
EXIT_OK: Final[int] = 0
EXIT_ERROR: Final[int] = 1
EXIT_USAGE: Final[int] = 2  # argparse's own code for bad usage; a bad setting is bad usage too

COMMANDS_EPILOG: Final[str] = """\
commands:
  spendgate serve [FLAGS]                         run the sidecar until SIGTERM or SIGINT
  spendgate budget set CUSTOMER --limit N         create a budget or change its limit and policy (see --help)
  spendgate budget show CUSTOMER                  print a budget's counters and policy
  spendgate budget freeze|unfreeze CUSTOMER       deny every Reserve (or allow them again)
  spendgate budget grant CUSTOMER AMOUNT --key K  add prepaid credits on top of the limit, once per key
  spendgate usage CUSTOMER [--period P]           usage of a period: quota, projection, daily series, breakdowns
  spendgate usage-link CUSTOMER [--ttl 1h]        a signed link to the customer's own usage page (--allow-limit)
  spendgate budget list [--prefix P]              list budgets, one a line
  spendgate settle [FLAGS] [--follow]             drain the outbox to Stripe (only while no sidecar runs)
  spendgate settle status                         settlement to Stripe of a running sidecar
  spendgate deadletter list                       usages Stripe refused, with the reason
  spendgate deadletter requeue SEQ...             send them again after fixing the cause (or --all)
  spendgate reconcile [--period YYYY-MM]          compare the ledger with Stripe's meter totals (exit 3: they differ)
  spendgate ledger export CUSTOMER --format csv|jsonl [--period P] [--output FILE]
                                                  every ledger entry of a period (archived ones too), with its Stripe
                                                  identifiers and settlement state; count and total on stderr
  spendgate backup DEST                           a running sidecar writes a consistent copy of its data to DEST
  spendgate restore SRC --data-dir DIR [--force]  put a backup in place (only while no sidecar runs on DIR)
  spendgate inspect [--data-dir DIR] [SECTION]    print budgets, holds, outbox, ledger tail, archive, dead letters
  spendgate invoices release INVOICE              let Stripe finalize a draft the invoice-spike guard held
  spendgate check-config FILE                     validate a config file offline; problems point to their line
  spendgate health [--target HOST:PORT]           exit 0 when the sidecar's gRPC health says SERVING (probes)

Client commands send --token (or $SPENDGATE_TOKEN) and talk TLS with --tls-root-cert (mTLS: --tls-client-cert/-key).

Settings come from flags > SPENDGATE_<NAME> environment variables > the TOML file of --config or SPENDGATE_CONFIG
> defaults. `spendgate serve --help` lists them all.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "without_settings", False):  # check-config judges its file alone, not this environment
        return int(args.run(args, None))
    try:
        settings = _settings(args)
    except config.ConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    result: int = args.run(args, settings)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A gRPC budget-enforcement sidecar for LLM spend.",
        epilog=COMMANDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config_parent = argparse.ArgumentParser(add_help=False)
    config_parent.add_argument(
        "--config", metavar="FILE", help=f"TOML file of settings (default: ${config.CONFIG_ENV_VAR}, if set)"
    )

    serve = commands.add_parser("serve", parents=[config_parent], help="run the sidecar until SIGTERM or SIGINT")
    serve.description = "Run the sidecar. Every setting is a flag; flags win over the environment and the file."
    for name in config.FIELDS:
        _add_setting_flag(serve, name)
    serve.set_defaults(run=run_serve)

    budget = commands.add_parser("budget", help="create, change and show budgets on a running sidecar")
    budget_commands = budget.add_subparsers(dest="budget_command", metavar="COMMAND", required=True)
    target_parent = argparse.ArgumentParser(add_help=False, parents=[config_parent])
    target_parent.add_argument(
        "--target", metavar="HOST:PORT", help="the sidecar to talk to (default: the listen setting)"
    )
    _add_client_security_flags(target_parent)

    budget_set = budget_commands.add_parser("set", parents=[target_parent], help="create a budget or change its limit")
    budget_set.add_argument("customer_id", metavar="CUSTOMER")
    budget_set.add_argument(
        "--limit", type=int, metavar="N", help="the hard cap per period, in budget units (required to create)"
    )
    budget_set.add_argument(
        "--stripe-customer-id",
        default="",
        metavar="ID",
        help="Stripe customer to bill (default: the org's for a member, else CUSTOMER; unchanged on update)",
    )
    _add_policy_flags(budget_set)
    budget_set.set_defaults(run=run_budget_set)

    for verb, frozen in (("freeze", True), ("unfreeze", False)):
        freeze = budget_commands.add_parser(
            verb, parents=[target_parent], help="deny every Reserve" if frozen else "allow Reserves again"
        )
        freeze.add_argument("customer_id", metavar="CUSTOMER")
        freeze.add_argument("--reason", default="", help="why (kept with the budget and put in the alert)")
        freeze.set_defaults(run=run_budget_freeze, frozen=frozen)

    grant = budget_commands.add_parser(
        "grant", parents=[target_parent], help="add prepaid credits on top of a budget's limit (once per --key)"
    )
    grant.description = (
        "Add AMOUNT credits on top of the budget's limit (Admin.GrantCredits): relative, so two grants never undo "
        "each other. Once per --key: running it again with the same key grants nothing more and says so."
    )
    grant.add_argument("customer_id", metavar="CUSTOMER")
    grant.add_argument("amount", type=int, metavar="AMOUNT", help="credits to add, in budget units (> 0)")
    grant.add_argument(
        "--key", required=True, metavar="K",
        help="idempotency key naming this grant (e.g. the payment's id); the same key again is a replay",
    )  # fmt: skip
    grant.add_argument("--reason", default="", metavar="R", help="why (kept in the ledger entry)")
    grant.set_defaults(run=run_budget_grant)

    usage = commands.add_parser("usage", parents=[target_parent], help="a budget's usage in a period, as tables")
    usage.add_argument("customer_id", metavar="CUSTOMER")
    usage.add_argument(
        "--period", default="", metavar="P", help='"" or current (default), previous, or an ISO date in the period'
    )
    usage.add_argument("--top", type=int, default=10, metavar="N", help="largest values per dimension (default 10)")
    usage.set_defaults(run=run_usage)

    usage_link = commands.add_parser(
        "usage-link", parents=[target_parent], help="print a signed link to the customer's own usage page"
    )
    usage_link.description = (
        "Ask a running sidecar for a link to CUSTOMER's usage page on its http_listen, signed with its "
        "usage-link key. Prints the URL (stdout) and when it expires (stderr). Hand it to that customer only."
    )
    usage_link.add_argument("customer_id", metavar="CUSTOMER")
    usage_link.add_argument(
        "--ttl",
        type=_duration_ms,
        default=3_600_000,
        metavar="DURATION",
        help="how long the link opens the page: 90s, 30m, 1h (default), 7d; 1 min to 31 days",
    )
    usage_link.add_argument(
        "--allow-limit",
        action="store_true",
        help="the page may set the customer's own stop-at (it only ever lowers enforcement)",
    )
    usage_link.add_argument(
        "--ceiling",
        type=int,
        default=0,
        metavar="UNITS",
        help="with --allow-limit: the highest stop-at the customer may set, in units",
    )
    usage_link.set_defaults(run=run_usage_link)

    health = commands.add_parser(
        "health", parents=[target_parent], help="exit 0 when the sidecar reports SERVING (for exec probes)"
    )
    health.add_argument("--timeout-s", type=float, default=3.0, metavar="S", help="how long to wait (default 3)")
    health.set_defaults(run=run_health)

    budget_show = budget_commands.add_parser("show", parents=[target_parent], help="print a budget's counters")
    budget_show.add_argument("customer_id", metavar="CUSTOMER")
    budget_show.set_defaults(run=run_budget_show)

    budget_list = budget_commands.add_parser("list", parents=[target_parent], help="list budgets, one a line")
    budget_list.add_argument("--prefix", default="", help="only customer ids that start with this")
    budget_list.add_argument("--limit", type=int, default=100, metavar="N", help="at most N budgets (<= 10000)")
    budget_list.set_defaults(run=run_budget_list)

    settle = commands.add_parser(
        "settle",
        parents=[config_parent],
        help="drain the outbox to Stripe without the sidecar; `settle status` asks a running one",
    )
    settle.description = (
        "Send the committed usage waiting in the outbox of --data-dir to Stripe, then exit (with --follow: keep "
        "going until SIGTERM or SIGINT). For when the sidecar is not running: a running sidecar settles by itself, "
        "and owns the data dir. Needs STRIPE_API_KEY."
    )
    for name in config.FIELDS:
        _add_setting_flag(settle, name)
    settle.add_argument("--follow", action="store_true", help="keep settling new usage until SIGTERM or SIGINT")
    settle.set_defaults(run=run_settle)
    settle_commands = settle.add_subparsers(dest="settle_command", metavar="COMMAND")
    settle_status = settle_commands.add_parser(
        "status", parents=[target_parent], help="settlement status of a running sidecar"
    )
    settle_status.set_defaults(run=run_settle_status)

    deadletter = commands.add_parser("deadletter", help="usages Stripe refused for good, on a running sidecar")
    deadletter_commands = deadletter.add_subparsers(dest="deadletter_command", metavar="COMMAND", required=True)
    deadletter_list = deadletter_commands.add_parser(
        "list", parents=[target_parent], help="list dead letters, oldest first, with the reason"
    )
    deadletter_list.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (<= 10000)")
    deadletter_list.set_defaults(run=run_deadletter_list)
    deadletter_requeue = deadletter_commands.add_parser(
        "requeue",
        parents=[target_parent],
        help="send dead letters again, under fresh identifiers, after fixing the cause",
    )
    deadletter_requeue.add_argument("seqs", type=int, nargs="*", metavar="SEQ", help="the seq of a dead letter")
    deadletter_requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    deadletter_requeue.add_argument(
        "--confirmed-missing",
        action="store_true",
        help="also requeue letters that may be at Stripe already (fate unknown), after `spendgate reconcile` showed "
        "their usage missing; without it those are refused, since a fresh identifier would bill them twice",
    )
    deadletter_requeue.set_defaults(run=run_deadletter_requeue)

    reconcile = commands.add_parser(
        "reconcile", parents=[config_parent], help="compare the ledger's totals with Stripe's meter event summaries"
    )
    reconcile.description = (
        "Sum the units committed per Stripe customer in a period from the ledger of --data-dir (read-only; the "
        "sidecar may be running) and compare them with Stripe's meter event summaries. Exit 0: every customer within "
        "the tolerance; 3: a customer differs by more; 1: could not reconcile. Needs STRIPE_API_KEY."
    )
    for name in ("data_dir", "stripe_api_key", "stripe_api_base", "settle_event_name"):
        _add_setting_flag(reconcile, name)
    period = reconcile.add_mutually_exclusive_group()
    period.add_argument("--period", metavar="YYYY-MM", help="a calendar month in UTC (default: the current one)")
    period.add_argument("--start", metavar="DATE", help="ISO date or date-time, inclusive (UTC unless it says)")
    reconcile.add_argument("--end", metavar="DATE", help="ISO date or date-time, exclusive (default: now)")
    reconcile.add_argument(
        "--tolerance-percent", type=float, default=1.0, metavar="P",
        help="a customer mismatches when Stripe and the settled ledger differ by more than P%% (default 1)",
    )  # fmt: skip
    reconcile.add_argument(
        "--customer", action="append", default=[], metavar="CUS", help="only this Stripe customer (repeatable)"
    )
    reconcile.add_argument(
        "--fix", action="store_true",
        help="offer to cancel the meter events given with --cancel (within Stripe's 24 h window) where Stripe is over",
    )  # fmt: skip
    reconcile.add_argument(
        "--cancel", action="append", default=[], metavar="IDENTIFIER",
        help="with --fix: a meter event identifier to cancel (repeatable)",
    )  # fmt: skip
    reconcile.add_argument(
        "--cancel-file", action="append", default=[], metavar="FILE", help="with --fix: identifiers, one a line"
    )
    reconcile.add_argument("--yes", action="store_true", help="with --fix: do not ask for confirmation")
    reconcile.set_defaults(run=run_reconcile)
    _add_data_care_commands(commands, config_parent, target_parent)
    _add_ledger_commands(commands, target_parent)
    return parser


def _add_ledger_commands(commands: Any, target_parent: argparse.ArgumentParser) -> None:
    ledger = commands.add_parser("ledger", help="the audit trail of a running sidecar (Admin.ListLedger)")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    export = ledger_commands.add_parser(
        "export", parents=[target_parent],
        help="write every ledger entry of a budget period, archived ones included, as CSV or JSON lines",
    )  # fmt: skip
    export.description = (
        "Page through Admin.ListLedger and write every entry of the period: time, reservation id, amount, model and "
        "tokens by type, dimensions, the Stripe customer and meter event identifiers, and the settlement state "
        "(pending, sent, dead_letter). An org's period includes its members' entries. Prints the count and the "
        "total to stderr beside GetUsage's for the same period; exit 1 when a closed period's differ."
    )
    export.add_argument("customer_id", metavar="CUSTOMER")
    export.add_argument(
        "--period", default="", metavar="P", help='"" or current (default), previous, or an ISO date in the period'
    )
    export.add_argument("--format", required=True, choices=("csv", "jsonl"), dest="export_format")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout (replaced atomically)")
    export.set_defaults(run=run_ledger_export)


def run_ledger_export(args: argparse.Namespace, settings: config.Settings) -> int:
    import os
    import tempfile

    from spendgate import ledger_export
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    def run(channel: Any) -> tuple[Any, Any]:
        admin = pb_grpc.AdminStub(channel)

        def list_ledger(request: Any) -> Any:
            return admin.ListLedger(request, timeout=RPC_TIMEOUT_S)

        if args.output is None:
            summary = ledger_export.export(list_ledger, args.customer_id, args.period, args.export_format, sys.stdout)
            sys.stdout.flush()
        else:
            directory = os.path.dirname(os.path.abspath(args.output))
            with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".ledger-", delete=False, newline="") as out:
                try:
                    summary = ledger_export.export(list_ledger, args.customer_id, args.period, args.export_format, out)
                except BaseException:
                    os.unlink(out.name)
                    raise
            os.replace(out.name, args.output)
        request = pb.GetUsageRequest(
            customer_id=args.customer_id, period=ledger_export.inside_period(summary.period_start_ms)
        )
        return summary, pb_grpc.BudgetStub(channel).GetUsage(request, timeout=RPC_TIMEOUT_S)

    try:
        done = _call(args, settings, run)
    except ledger_export.ExportError as error:
        print(f"{PROG}: ledger export: {error}", file=sys.stderr)
        return EXIT_ERROR
    if done is None:
        return EXIT_ERROR
    summary, usage = done
    grants = f" (and {summary.grants} credit grants, which are not usage)" if summary.grants else ""
    print(
        f"exported {summary.entries} entries, total {summary.total} units{grants}; GetUsage for the period: "
        f"{usage.commits} commits, total {usage.total} units",
        file=sys.stderr,
    )
    if (summary.entries, summary.total) != (usage.commits, usage.total):
        if usage.current:
            print(
                "the period is still open: commits made during the export are in GetUsage, not in the export",
                file=sys.stderr,
            )
        else:
            print(
                f"{PROG}: ledger export: the closed period's entries do not add up to GetUsage's total: report "
                "this as a bug",
                file=sys.stderr,
            )
            return EXIT_ERROR
    return EXIT_OK


def _add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help=f"bearer token to send (default: ${config.TOKEN_ENV_VAR}); prefer --token-file")
    parser.add_argument("--token-file", metavar="FILE", help="read the token from FILE (keeps it out of `ps`)")
    parser.add_argument("--tls-root-cert", metavar="PEM", help="talk TLS, trusting this CA for the sidecar's cert")
    parser.add_argument("--tls-client-cert", metavar="PEM", help="mTLS: this client's certificate chain")
    parser.add_argument("--tls-client-key", metavar="PEM", help="mTLS: this client's private key")
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="the name the sidecar's certificate is for, when --target differs "
        "(e.g. a probe dialling 127.0.0.1)",
    )  # fmt: skip


def _add_data_care_commands(
    commands: Any, config_parent: argparse.ArgumentParser, target_parent: argparse.ArgumentParser
) -> None:
    backup = commands.add_parser(
        "backup",
        parents=[target_parent],
        help="a running sidecar writes a consistent, compacted copy of its data to DEST",
    )
    backup.add_argument("dest", metavar="DEST", help="a new or empty directory (on the sidecar's machine)")
    backup.set_defaults(run=run_backup)

    restore = commands.add_parser(
        "restore",
        parents=[config_parent],
        help="put a backup in place of --data-dir (only while no sidecar runs on it)",
    )
    restore.add_argument("source", metavar="SRC", help="a directory `spendgate backup` wrote")
    restore.add_argument(
        "--force",
        action="store_true",
        help="restore over a data dir that is not empty (its contents are moved aside, never deleted)",
    )
    for name in ("data_dir", "map_size_mb"):
        _add_setting_flag(restore, name)
    restore.set_defaults(run=run_restore)

    inspect = commands.add_parser(
        "inspect",
        parents=[config_parent],
        help="print a data dir's budgets, holds, outbox, ledger tail and dead letters",
    )
    inspect.description = (
        "Read --data-dir read-only (with the lmdb package, from this process), also while its sidecar runs."
    )
    inspect.add_argument(
        "sections",
        nargs="*",
        metavar="SECTION",
        choices=[[], *INSPECT_SECTIONS],
        help=f"one or more of {', '.join(INSPECT_SECTIONS)} (default: all)",
    )
    inspect.add_argument("--limit", type=int, default=20, metavar="N", help="at most N rows a section (default 20)")
    inspect.add_argument("--all", action="store_true", help="holds: also the ended ones kept for retries")
    inspect.add_argument("--json", action="store_true", help="one JSON object a row")
    _add_setting_flag(inspect, "data_dir")
    inspect.set_defaults(run=run_inspect)

    key = commands.add_parser("key", help="virtual API keys for the proxy, one per customer, on a running sidecar")
    key_commands = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    key_create = key_commands.add_parser(
        "create", parents=[target_parent], help="make a key for CUSTOMER (who has a budget) and print it, once"
    )
    key_create.add_argument("customer_id", metavar="CUSTOMER")
    key_create.set_defaults(run=run_key_create)
    key_list = key_commands.add_parser("list", parents=[target_parent], help="list the keys (ids, never the keys)")
    key_list.add_argument("--customer", default="", metavar="CUSTOMER", help="only this customer's keys")
    key_list.set_defaults(run=run_key_list)
    key_revoke = key_commands.add_parser(
        "revoke", parents=[target_parent], help="remove the key with id ID, or every key of customer ID"
    )
    key_revoke.add_argument("key_id", metavar="ID")
    key_revoke.set_defaults(run=run_key_revoke)

    invoices = commands.add_parser("invoices", help="Stripe draft invoices the invoice-spike guard held")
    invoice_commands = invoices.add_subparsers(dest="invoices_command", metavar="COMMAND", required=True)
    invoice_release = invoice_commands.add_parser(
        "release",
        parents=[target_parent],
        help="let Stripe finalize a held draft invoice (the sidecar sets its auto_advance back to true)",
    )
    invoice_release.add_argument("invoice_id", metavar="INVOICE", help="the Stripe invoice id (in_...)")
    invoice_release.set_defaults(run=run_invoices_release)

    check = commands.add_parser("check-config", help="validate a TOML config file offline (exit 2 on problems)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=run_check_config, without_settings=True)


# Sections of `spendgate inspect` (spendgate.datacare.INSPECT_SECTIONS, repeated here so that --help stays light).
INSPECT_SECTIONS: Final[tuple[str, ...]] = ("budgets", "holds", "outbox", "ledger", "archive", "deadletters")
# A backup of a large environment takes a while; the sidecar keeps serving meanwhile.
BACKUP_TIMEOUT_S: Final[float] = 3600.0


def _add_setting_flag(parser: argparse.ArgumentParser, name: str) -> None:
    default = config.FIELDS[name].default
    help_text = f"{config.doc(name)} (env {config.env_var(name)}; default {default!r})".replace("%", "%%")
    if isinstance(default, bool):
        parser.add_argument(config.flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        return
    metavar = "N" if isinstance(default, int) else "|".join(config.FIELDS[name].metadata["choices"]) or "TEXT"
    metavar = "JSON" if isinstance(default, tuple) else metavar
    metavar = {"listen": "HOST:PORT", "data_dir": "DIR", "webhook_listen": "HOST:PORT"}.get(name, metavar)
    parser.add_argument(config.flag(name), dest=name, type=_setting_type(name), metavar=metavar, help=help_text)


def _setting_type(name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return config.parse_text(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _settings(args: argparse.Namespace) -> config.Settings:
    flags = {name: getattr(args, name, None) for name in config.FIELDS}
    return config.load_settings(flags=flags, config_file=args.config)


# -- commands -------------------------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace, settings: config.Settings) -> int:
    import asyncio

    from spendgate import _core
    from spendgate.datacare import DataCareError
    from spendgate.logs import secret_values
    from spendgate.server import app
    from spendgate.settle import SettlementConfigError

    app.configure_logging(settings.log_level, settings.log_format, secrets=secret_values(settings))
    try:
        return asyncio.run(app.serve(settings))
    except (SettlementConfigError, config.ConfigError) as error:  # e.g. webhook_listen without a secret
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DataCareError as error:  # a half-restored data dir, or a lost one that must not be recreated empty
        print(f"{PROG}: refusing to serve: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # the webhook port cannot be bound
        print(f"{PROG}: cannot serve webhooks on {settings.webhook_listen}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except _core.EngineError as error:  # e.g. a bad engine setting or a data dir another process holds
        print(f"{PROG}: cannot open the engine on {settings.data_dir}: {error.kind}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as error:  # grpc raises it when the address cannot be bound
        print(f"{PROG}: cannot serve on {settings.listen}: {error}", file=sys.stderr)
        return EXIT_ERROR


def run_key_create(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.CreateVirtualKeyRequest(customer_id=args.customer_id)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).CreateVirtualKey(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(reply.key)
    print(
        f"{PROG}: key {reply.virtual_key.key_id} for customer {reply.virtual_key.customer_id!r}; it is shown only "
        "this once (spendgate keeps its hash)",
        file=sys.stderr,
    )
    return EXIT_OK


def run_key_list(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.ListVirtualKeysRequest(customer_id=args.customer)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).ListVirtualKeys(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    for key in reply.virtual_keys:
        print(f"{key.key_id}  {key.customer_id}  created_ms={key.created_ms}")
    return EXIT_OK


def run_invoices_release(args: argparse.Namespace, settings: config.Settings) -> int:
    """Admin.ReleaseInvoice: the sidecar holds the Stripe key and the guard's records, so it makes the call."""
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.ReleaseInvoiceRequest(invoice_id=args.invoice_id)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).ReleaseInvoice(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    held = "" if reply.was_held else " (the guard had not held it, or it was released already)"
    print(
        f"released {reply.invoice_id} of {reply.stripe_customer_id}: {reply.total} {reply.currency}, status "
        f"{reply.status}, auto_advance {'true' if reply.auto_advance else 'false'}: Stripe finalizes it on its own "
        f"schedule now{held}"
    )
    return EXIT_OK


def run_key_revoke(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.RevokeVirtualKeyRequest(key_id_or_customer_id=args.key_id)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).RevokeVirtualKey(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    for key in reply.revoked:
        print(f"revoked {key.key_id} ({key.customer_id})")
    return EXIT_OK


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--included", type=int, metavar="N", help="the plan's included quota per period")
    parser.add_argument("--soft-limit", type=int, metavar="N", help="alert once a period when spent reaches N (0: off)")
    parser.add_argument("--mode", choices=("hard", "soft"), help="hard: deny past the limit; soft: grant and flag")
    parser.add_argument(
        "--block-overage", action=argparse.BooleanOptionalAction, help="kill switch: deny past the included quota"
    )
    parser.add_argument("--parent", metavar="ORG", help="make it a member of the org budget ORG (once)")
    parser.add_argument(
        "--period", choices=("month", "lifetime", "fixed"),
        help="month: calendar months in UTC (or from --period-anchor); lifetime: never resets; fixed: "
        "--period-start..--period-end, then the same length again",
    )  # fmt: skip
    parser.add_argument("--period-anchor", metavar="DATE", help="month: ISO date-time the months start from")
    parser.add_argument("--period-start", metavar="DATE", help="fixed: ISO date-time the current period starts")
    parser.add_argument("--period-end", metavar="DATE", help="fixed: ISO date-time the current period ends")
    parser.add_argument("--breaker-multiplier", type=int, metavar="N", help="-1: the server's; 0: off; 2..1000")
    parser.add_argument(
        "--stop-at", type=int, metavar="N", help="the customer's own stop-at, as the usage page sets it (0: remove it)"
    )


def _iso_ms(text: str, flag: str) -> int:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not an ISO date or date-time such as 2026-11-15T00:00Z") from None
    return int((when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp() * 1000)


def _period_message(args: argparse.Namespace) -> Any:
    from spendgate.v1 import spendgate_pb2 as pb

    if args.period is None:
        return None
    if args.period == "lifetime":
        return pb.Period(kind=pb.PERIOD_KIND_LIFETIME)
    if args.period == "month":
        anchor = _iso_ms(args.period_anchor, "--period-anchor") if args.period_anchor else 0
        return pb.Period(kind=pb.PERIOD_KIND_MONTHLY, anchor_ms=anchor)
    if not (args.period_start and args.period_end):
        raise ValueError("--period fixed needs --period-start and --period-end")
    return pb.Period(
        kind=pb.PERIOD_KIND_FIXED,
        start_ms=_iso_ms(args.period_start, "--period-start"),
        end_ms=_iso_ms(args.period_end, "--period-end"),
    )


def run_budget_set(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.client import _set_budget_request
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    try:
        period = _period_message(args)
    except ValueError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    request = _set_budget_request(
        args.customer_id, args.limit, args.stripe_customer_id, included=args.included, soft_limit=args.soft_limit,
        mode=args.mode, block_overage=args.block_overage, parent_id=args.parent, period=period,
        breaker_multiplier=args.breaker_multiplier, stop_at=args.stop_at,
    )  # fmt: skip
    reply = _call(args, settings, lambda channel: pb_grpc.AdminStub(channel).SetBudget(request, timeout=RPC_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(f"{'created' if reply.created else 'updated'} budget {reply.balance.customer_id}")
    print(format_balance(reply.balance))
    return EXIT_OK


def run_budget_freeze(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.FreezeBudgetRequest(customer_id=args.customer_id, frozen=args.frozen, reason=args.reason)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).FreezeBudget(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(f"{'froze' if args.frozen else 'unfroze'} budget {reply.balance.customer_id}")
    print(format_balance(reply.balance))
    return EXIT_OK


def run_budget_grant(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.client import _grant_request
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = _grant_request(args.customer_id, args.amount, args.key, args.reason)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).GrantCredits(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    if reply.replayed:
        print(f"already granted under key {args.key}: {reply.amount:,} credits to {reply.customer_id} (nothing added)")
    else:
        print(f"granted {reply.amount:,} credits to {reply.customer_id}")
    print(format_balance(reply.balance))
    return EXIT_OK


def run_health(args: argparse.Namespace, settings: config.Settings) -> int:
    """The standard grpc.health.v1 check of the whole server (service ""), as an exec probe: 0 SERVING, 1 not."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service="")
    reply = _call(
        args, settings, lambda channel: health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout_s)
    )
    if reply is None:
        return EXIT_ERROR
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return EXIT_OK if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_ERROR


def run_usage(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.GetUsageRequest(customer_id=args.customer_id, period=args.period, top=args.top)
    reply = _call(args, settings, lambda channel: pb_grpc.BudgetStub(channel).GetUsage(request, timeout=RPC_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(format_usage(reply))
    return EXIT_OK


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under a header; the first column left-aligned, numbers right-aligned with thousands separators."""
    cells = [[f"{cell:,}" if isinstance(cell, int) else str(cell) for cell in row] for row in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells]) for i, title in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(header), *(line(row) for row in cells)])


def format_usage(usage: Any) -> str:
    """GetUsage as the tables a person reads: the period's figures, the daily series, and the breakdowns."""
    import datetime as dt

    def date(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    end = date(usage.period_end_ms) if usage.period_end_ms else "never (lifetime)"
    summary = [
        ("period", f"{date(usage.period_start_ms)} .. {end}{'' if usage.current else ' (closed)'}"),
        ("total", usage.total), ("commits", usage.commits), ("included", usage.included),
        ("included_remaining", usage.included_remaining), ("overage", usage.overage), ("limit", usage.limit),
        ("credits", usage.credits), ("credits_granted", usage.credits_granted), ("grants", usage.grants),
        ("projected_total", usage.projected_total), ("projected_overage", usage.projected_overage),
    ]  # fmt: skip
    parts = [f"usage of {usage.customer_id}", _table(("figure", "value"), summary)]
    parts += ["", "daily", _table(("date", "units"), [(day.date, day.units) for day in usage.daily])]
    if usage.by_model:
        rows = [(m.model, m.token_type, m.tokens, m.units) for m in usage.by_model]
        parts += ["", "by model", _table(("model", "token_type", "tokens", "units"), rows)]
    if usage.by_dimension:
        dimension_rows = [(d.key, d.value, d.units) for d in usage.by_dimension]
        parts += ["", "by dimension", _table(("dimension", "value", "units"), dimension_rows)]
    if usage.folded_dimension_keys:
        keys = ", ".join(usage.folded_dimension_keys)
        parts += ["", f"past the tracking bound, further values are summed as (other): {keys}"]
    return "\n".join(parts)


def run_budget_show(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.GetBalanceRequest(customer_id=args.customer_id)
    reply = _call(
        args, settings, lambda channel: pb_grpc.BudgetStub(channel).GetBalance(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(format_balance(reply))
    return EXIT_OK


def run_budget_list(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.ListBudgetsRequest(prefix=args.prefix, limit=args.limit)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).ListBudgets(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(format_budget_list(reply.budgets))
    return EXIT_OK


def run_settle(args: argparse.Namespace, settings: config.Settings) -> int:
    import asyncio

    from spendgate import _core
    from spendgate.logs import secret_values
    from spendgate.server import app
    from spendgate.settle import SettlementConfigError
    from spendgate.settle.service import settle_standalone

    if not settings.stripe_api_key:
        print(f"{PROG}: STRIPE_API_KEY is not set: there is nothing to settle with", file=sys.stderr)
        return EXIT_USAGE
    app.configure_logging(settings.log_level, settings.log_format, secrets=secret_values(settings))
    try:
        engine = _core.Engine(settings.data_dir, **settings.engine_kwargs())
    except _core.EngineError as error:
        if error.kind == "failed_precondition":  # the lock file: a sidecar (or another settle) owns the data dir
            print(
                f"{PROG}: {settings.data_dir} is in use by another spendgate process, most likely the running sidecar: "
                "it settles by itself (see `spendgate settle status`); run `spendgate settle` only while it is stopped",
                file=sys.stderr,
            )
        else:
            print(
                f"{PROG}: cannot open the engine on {settings.data_dir}: {error.kind}: {error.message}", file=sys.stderr
            )
        return EXIT_ERROR
    try:
        return asyncio.run(settle_standalone(engine, settings, follow=args.follow))
    except SettlementConfigError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.close()


def run_reconcile(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.settle import reconcile

    if (args.cancel or args.cancel_file) and not args.fix:
        print(f"{PROG}: reconcile: --cancel and --cancel-file go with --fix", file=sys.stderr)
        return EXIT_USAGE
    try:
        cancel = [*args.cancel, *reconcile.read_identifiers(args.cancel_file)]
    except OSError as error:
        print(f"{PROG}: reconcile: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = reconcile.Options(
        period=args.period, start=args.start, end=args.end, tolerance_percent=args.tolerance_percent,
        customers=tuple(args.customer), fix=args.fix, cancel=tuple(cancel), yes=args.yes,
    )  # fmt: skip
    return reconcile.run(settings, options)


def run_settle_status(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.GetSettlementStatusRequest()
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).GetSettlementStatus(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(format_settlement_status(reply))
    return EXIT_OK


def run_deadletter_list(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.ListDeadLettersRequest(limit=args.limit)
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).ListDeadLetters(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(format_dead_letters(reply.dead_letters))
    return EXIT_OK


def run_deadletter_requeue(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    if bool(args.seqs) == bool(args.all):
        print(f"{PROG}: deadletter requeue: give SEQ... or --all (not both)", file=sys.stderr)
        return EXIT_USAGE

    def requeue(channel: Any) -> list[int] | None:
        stub = pb_grpc.AdminStub(channel)
        seqs = list(args.seqs)
        if args.all:
            listed = stub.ListDeadLetters(pb.ListDeadLettersRequest(limit=10_000), timeout=RPC_TIMEOUT_S)
            seqs = [letter.seq for letter in listed.dead_letters]
        for seq in seqs:
            request = pb.RequeueDeadLetterRequest(seq=seq, confirmed_missing=args.confirmed_missing)
            stub.RequeueDeadLetter(request, timeout=RPC_TIMEOUT_S)
            print(f"requeued seq {seq}: it goes to Stripe again under a fresh identifier")
        return seqs

    done = _call(args, settings, requeue)
    if done is None:
        return EXIT_ERROR
    if not done:
        print("no dead letters")
    return EXIT_OK


def format_settlement_status(status: Any) -> str:
    """Settlement as a two-column table; times as ages."""
    import time

    now_ms = time.time_ns() // 1_000_000

    def ago(ms: int) -> str:
        return "never" if ms == 0 else f"{(now_ms - ms) / 1000:.1f} s ago"

    rows = [
        ("enabled", "yes" if status.enabled else "NO (no STRIPE_API_KEY: usage accumulates in the outbox)"),
        ("transport", status.transport or "-"),
        ("event_name", status.event_name or "-"),
        (
            "aggregate_window_ms",
            str(status.aggregate_window_ms)
            if status.aggregate_window_ms
            else "per customer per second now (a backlog waits)"
            if status.auto_aggregating
            else "off (per customer per second while a backlog waits)"
            if status.auto_aggregate
            else "off",
        ),
        ("outbox_depth", f"{status.outbox_depth} of {status.max_outbox_entries}"),
        ("oldest_age_ms", str(status.oldest_age_ms)),
        ("dead_letters", str(status.dead_letters)),
        ("last_success", ago(status.last_success_ms)),
        ("last_error", f"{status.last_error} ({ago(status.last_error_ms)})" if status.last_error else "none"),
        ("failing_since", ago(status.failing_since_ms) if status.failing_since_ms else "not failing"),
        ("delivered", f"{status.delivered_events} events, {status.delivered_entries} entries since start"),
        ("dead_lettered", f"{status.dead_lettered_entries} entries since start"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


DEAD_LETTER_COLUMNS: Final[tuple[str, ...]] = (
    "seq",
    "customer_id",
    "stripe_customer_id",
    "amount",
    "attempts",
    "requeues",
)


def format_dead_letters(letters: Sequence[Any]) -> str:
    """One block per dead letter: its ids and amount on one line, the reason on the next."""
    if not letters:
        return "no dead letters"
    lines = []
    for letter in letters:
        fields = " ".join(f"{column}={getattr(letter, column)}" for column in DEAD_LETTER_COLUMNS)
        lines.append(f"{fields} identifier={letter.sent_as or letter.identifier}")
        lines.append(f"    reason: {letter.reason}")
        if letter.fate_unknown:
            lines.append(
                "    may be at Stripe already: requeue only with --confirmed-missing, after `spendgate reconcile`"
            )
    return "\n".join(lines)


LIST_COLUMNS: Final[tuple[str, ...]] = ("customer_id", "limit", "spent", "reserved", "remaining", "active_holds")


def format_budget_list(budgets: Sequence[Any]) -> str:
    """Budgets as a table with a header row; ids left-aligned, numbers right-aligned."""
    rows = [[str(getattr(budget, column)) for column in LIST_COLUMNS] for budget in budgets]
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(LIST_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = (f"{cell:>{width}}" for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    return "\n".join([line(LIST_COLUMNS), *(line(row) for row in rows)] or [])


DURATION_UNITS_MS: Final[dict[str, int]] = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _duration_ms(text: str) -> int:
    """90s, 30m, 1h, 7d, 500ms, or plain seconds -> milliseconds (argparse type)."""
    stripped = text.strip().lower()
    number, suffix = stripped, "s"
    for unit in sorted(DURATION_UNITS_MS, key=len, reverse=True):
        if stripped.endswith(unit):
            number, suffix = stripped[: -len(unit)], unit
            break
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 30m, 1h or 7d, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return round(value * DURATION_UNITS_MS[suffix])


def run_usage_link(args: argparse.Namespace, settings: config.Settings) -> int:
    import time

    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    if args.ceiling and not args.allow_limit:
        print(f"{PROG}: --ceiling applies only with --allow-limit", file=sys.stderr)
        return EXIT_USAGE
    if args.allow_limit and args.ceiling <= 0:
        print(f"{PROG}: --allow-limit needs --ceiling UNITS: the highest stop-at the customer may set", file=sys.stderr)
        return EXIT_USAGE
    request = pb.CreateUsageLinkRequest(
        customer_id=args.customer_id, ttl_ms=args.ttl, allow_limit=args.allow_limit, ceiling=args.ceiling
    )
    reply = _call(
        args, settings, lambda channel: pb_grpc.AdminStub(channel).CreateUsageLink(request, timeout=RPC_TIMEOUT_S)
    )
    if reply is None:
        return EXIT_ERROR
    print(reply.url)
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reply.expires_at_ms // 1000))
    scope = f"view and set the stop-at up to {reply.ceiling:,} units" if reply.scope == "limit" else "view only"
    print(f"{PROG}: the link opens {args.customer_id}'s usage page until {expires} ({scope})", file=sys.stderr)
    return EXIT_OK


def _call(args: argparse.Namespace, settings: config.Settings, rpc: Any) -> Any:
    """rpc(channel)'s reply, or None after printing the server's message to stderr."""
    import grpc

    target = args.target or client_target(settings.listen)
    try:
        channel = _client_channel(args, target)
    except (OSError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return None
    with channel:
        try:
            return rpc(channel)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"cannot reach a spendgate sidecar at {target}: {details}"
            print(f"{PROG}: {code.name}: {details}", file=sys.stderr)
            return None


def _client_channel(args: argparse.Namespace, target: str) -> Any:
    """A channel to `target`: TLS when a --tls-* flag is given, sending the token on every call when there is one."""
    import os

    import grpc

    pem = {
        name: _read_file(getattr(args, name, None), flag)
        for name, flag in (
            ("tls_root_cert", "--tls-root-cert"),
            ("tls_client_cert", "--tls-client-cert"),
            ("tls_client_key", "--tls-client-key"),
        )
    }
    if (pem["tls_client_cert"] is None) != (pem["tls_client_key"] is None):
        raise ValueError("mTLS needs both --tls-client-cert and --tls-client-key")
    if any(value is not None for value in pem.values()):
        credentials = grpc.ssl_channel_credentials(pem["tls_root_cert"], pem["tls_client_key"], pem["tls_client_cert"])
        server_name = getattr(args, "tls_server_name", None)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options)
    else:
        channel = grpc.insecure_channel(target)
    token_file = _read_file(getattr(args, "token_file", None), "--token-file")
    token = (
        getattr(args, "token", None)
        or (token_file.decode().strip() if token_file else None)
        or os.environ.get(config.TOKEN_ENV_VAR)
    )
    return grpc.intercept_channel(channel, _bearer_interceptor_class()(token)) if token else channel


def _read_file(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise OSError(f"{flag} {path}: cannot read it: {error.strerror or error}") from None


def _bearer_interceptor_class() -> Any:
    """The interceptor class, made on first use so that `--help` never imports grpc."""
    import grpc

    class BearerToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        """Adds `authorization: Bearer <token>` to every call (plain metadata: works over plaintext loopback too)."""

        def __init__(self, token: str) -> None:
            self._metadata = (("authorization", f"Bearer {token}"),)

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            metadata = (*(details.metadata or ()), *self._metadata)
            return continuation(details._replace(metadata=metadata), request)

    return BearerToken


def client_target(listen: str) -> str:
    """The address to dial for a server that listens on `listen`: a wildcard host means this machine."""
    host, separator, port = listen.rpartition(":")
    if separator and host in ("0.0.0.0", "[::]", ""):
        return f"127.0.0.1:{port}"
    return listen


BALANCE_ROWS: Final[tuple[str, ...]] = (
    "customer_id",
    "stripe_customer_id",
    "limit",
    "spent",
    "reserved",
    "remaining",
    "credits",
    "active_holds",
    "overdraft",
    "included",
    "soft_limit",
)


def format_balance(balance: Any) -> str:
    """A budget as a two-column table, one counter a line, numbers right-aligned."""
    width = max(len(row) for row in BALANCE_ROWS)
    values = {row: str(getattr(balance, row)) for row in BALANCE_ROWS}
    value_width = max(len(v) for v in values.values())
    lines = []
    for row in BALANCE_ROWS:
        value = getattr(balance, row)
        shown = f"{value:>{value_width}}" if isinstance(value, int) else values[row]
        lines.append(f"  {row:<{width}}  {shown}")
    return "\n".join(lines + [f"  {name:<{width}}  {text}" for name, text in policy_rows(balance)])


def policy_rows(balance: Any) -> list[tuple[str, str]]:
    """The budget's policy, in words."""
    import datetime as dt

    from spendgate.v1 import spendgate_pb2 as pb

    def date(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    end = date(balance.period_end_ms) if balance.period_end_ms else "never"
    kind = pb.PeriodKind.Name(balance.period.kind).removeprefix("PERIOD_KIND_").lower()
    rows = [
        ("mode", pb.EnforcementMode.Name(balance.mode).removeprefix("ENFORCEMENT_MODE_").lower()),
        ("block_overage", "on" if balance.block_overage else "off"),
        ("period", f"{kind}: {date(balance.period_start_ms)} .. {end}"),
        ("frozen", f"yes: {balance.frozen_reason}" if balance.frozen else "no"),
    ]
    if balance.stop_at:
        rows.append(("stop_at", f"{balance.stop_at:,} (the customer's own)"))
    if balance.parent_id:
        rows.append(("org", balance.parent_id))
    if balance.members:
        rows.append(("members", str(balance.members)))
    return rows


def run_backup(args: argparse.Namespace, settings: config.Settings) -> int:
    import os

    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    # Absolute: the sidecar resolves the path in its own working directory, not ours.
    request = pb.BackupRequest(dest_dir=os.path.abspath(args.dest))
    reply = _call(args, settings, lambda channel: pb_grpc.AdminStub(channel).Backup(request, timeout=BACKUP_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(
        f"backup written to {reply.dest_dir}: {reply.size_bytes:,} bytes in {reply.duration_ms:,} ms; it holds every "
        f"change acknowledged before it started (durable ticket {reply.durable_ticket}). Restore it with "
        f"`spendgate restore {reply.dest_dir} --data-dir DIR` while the sidecar is stopped"
    )
    return EXIT_OK


def run_restore(args: argparse.Namespace, settings: config.Settings) -> int:
    from pathlib import Path

    from spendgate.datacare import DataCareError, restore

    try:
        done = restore(Path(args.source), Path(settings.data_dir), force=args.force, map_size_mb=settings.map_size_mb)
    except (DataCareError, OSError) as error:
        print(f"{PROG}: restore: {error}", file=sys.stderr)
        return EXIT_ERROR
    aside = f"; the previous contents are in {done.moved_aside}" if done.moved_aside else ""
    print(
        f"restored {args.source} into {done.data_dir}: {done.budgets:,} budgets, {done.size_bytes:,} bytes, books "
        f"checked{aside}"
    )
    return EXIT_OK


def run_inspect(args: argparse.Namespace, settings: config.Settings) -> int:
    from pathlib import Path

    from spendgate.datacare import format_sections, inspect
    from spendgate.ledger_archive import ArchiveError
    from spendgate.store_reader import StoreReadError

    if args.limit < 1 or args.limit > 2048:
        print(f"{PROG}: inspect: --limit must be 1..2048, got {args.limit}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sections = inspect(
            Path(settings.data_dir), args.sections or INSPECT_SECTIONS, limit=args.limit, all_holds=args.all
        )
    except (StoreReadError, ArchiveError) as error:
        print(f"{PROG}: inspect: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(format_sections(sections, as_json=args.json))
    return EXIT_OK


def run_check_config(args: argparse.Namespace, _: None) -> int:
    from pathlib import Path

    from spendgate.server.security import startup_problems

    path = Path(args.file)
    try:
        values, problems = config.config_file_problems(path)
    except config.ConfigError as error:  # unreadable, or not TOML (the message has the line and column)
        problems, values = [str(error)], {}
    if not problems:
        problems = [f"config file {path}: {problem}" for problem in startup_problems(config.Settings(**values))]
    for problem in problems:
        print(f"{PROG}: check-config: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    print(f"{path}: OK ({len(values)} settings; the rest are defaults)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
