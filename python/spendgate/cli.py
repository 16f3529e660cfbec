"""The `spendgate` command line.

    spendgate serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR] ...   run the sidecar (a flag per setting)
    spendgate budget set CUSTOMER --limit N [--stripe-customer-id ID]            create a budget or change its limit
    spendgate budget show CUSTOMER                                               print a budget's counters
    spendgate budget list [--prefix P] [--limit N]                               list budgets, one a line

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
  spendgate budget set CUSTOMER --limit N         create a budget or change its limit
  spendgate budget show CUSTOMER                  print a budget's counters
  spendgate budget list [--prefix P]              list budgets, one a line

Settings come from flags > SPENDGATE_<NAME> environment variables > the TOML file of --config or SPENDGATE_CONFIG
> defaults. `spendgate serve --help` lists them all.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
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

    budget_set = budget_commands.add_parser(
        "set", parents=[target_parent], help="create a budget or change its limit"
    )
    budget_set.add_argument("customer_id", metavar="CUSTOMER")
    budget_set.add_argument("--limit", type=int, required=True, metavar="N", help="the limit, in budget units")
    budget_set.add_argument(
        "--stripe-customer-id",
        default="",
        metavar="ID",
        help="Stripe customer to bill (default: CUSTOMER on creation, unchanged on update)",
    )
    budget_set.set_defaults(run=run_budget_set)

    budget_show = budget_commands.add_parser("show", parents=[target_parent], help="print a budget's counters")
    budget_show.add_argument("customer_id", metavar="CUSTOMER")
    budget_show.set_defaults(run=run_budget_show)

    budget_list = budget_commands.add_parser("list", parents=[target_parent], help="list budgets, one a line")
    budget_list.add_argument("--prefix", default="", help="only customer ids that start with this")
    budget_list.add_argument("--limit", type=int, default=100, metavar="N", help="at most N budgets (<= 10000)")
    budget_list.set_defaults(run=run_budget_list)
    return parser


def _add_setting_flag(parser: argparse.ArgumentParser, name: str) -> None:
    default = config.FIELDS[name].default
    help_text = f"{config.doc(name)} (env {config.env_var(name)}; default {default!r})".replace("%", "%%")
    if isinstance(default, bool):
        parser.add_argument(config.flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        return
    metavar = "N" if isinstance(default, int) else "|".join(config.FIELDS[name].metadata["choices"]) or "TEXT"
    metavar = {"listen": "HOST:PORT", "data_dir": "DIR"}.get(name, metavar)
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
    from spendgate.server import app

    app.configure_logging(settings.log_level)
    try:
        return asyncio.run(app.serve(settings))
    except _core.EngineError as error:  # e.g. a bad engine setting or a data dir another process holds
        print(f"{PROG}: cannot open the engine on {settings.data_dir}: {error.kind}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as error:  # grpc raises it when the address cannot be bound
        print(f"{PROG}: cannot serve on {settings.listen}: {error}", file=sys.stderr)
        return EXIT_ERROR


def run_budget_set(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.SetBudgetRequest(
        customer_id=args.customer_id, limit=args.limit, stripe_customer_id=args.stripe_customer_id
    )
    reply = _call(args, settings, lambda channel: pb_grpc.AdminStub(channel).SetBudget(request, timeout=RPC_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(f"{'created' if reply.created else 'updated'} budget {reply.balance.customer_id}")
    print(format_balance(reply.balance))
    return EXIT_OK


def run_budget_show(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.GetBalanceRequest(customer_id=args.customer_id)
    reply = _call(args, settings, lambda channel: pb_grpc.BudgetStub(channel).GetBalance(request, timeout=RPC_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(format_balance(reply))
    return EXIT_OK


def run_budget_list(args: argparse.Namespace, settings: config.Settings) -> int:
    from spendgate.v1 import spendgate_pb2 as pb
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    request = pb.ListBudgetsRequest(prefix=args.prefix, limit=args.limit)
    reply = _call(args, settings, lambda channel: pb_grpc.AdminStub(channel).ListBudgets(request, timeout=RPC_TIMEOUT_S))
    if reply is None:
        return EXIT_ERROR
    print(format_budget_list(reply.budgets))
    return EXIT_OK


LIST_COLUMNS: Final[tuple[str, ...]] = ("customer_id", "limit", "spent", "reserved", "remaining", "active_holds")


def format_budget_list(budgets: Sequence[Any]) -> str:
    """Budgets as a table with a header row; ids left-aligned, numbers right-aligned."""
    rows = [[str(getattr(budget, column)) for column in LIST_COLUMNS] for budget in budgets]
    widths = [max([len(column)] + [len(row[i]) for row in rows]) for i, column in enumerate(LIST_COLUMNS)]
    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = (f"{cell:>{width}}" for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest])
    return "\n".join([line(LIST_COLUMNS), *(line(row) for row in rows)] or [])


def _call(args: argparse.Namespace, settings: config.Settings, rpc: Any) -> Any:
    """rpc(channel)'s reply, or None after printing the server's message to stderr."""
    import grpc

    target = args.target or client_target(settings.listen)
    with grpc.insecure_channel(target) as channel:
        try:
            return rpc(channel)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"cannot reach a spendgate sidecar at {target}: {details}"
            print(f"{PROG}: {code.name}: {details}", file=sys.stderr)
            return None


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
    "active_holds",
    "overdraft",
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
