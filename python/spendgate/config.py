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
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ENV_PREFIX: Final[str] = "SPENDGATE_"
CONFIG_ENV_VAR: Final[str] = "SPENDGATE_CONFIG"
# SPENDGATE_* variables that are not settings but are read elsewhere. Any other SPENDGATE_* variable is an error, so that
# a misspelt setting (SPENDGATE_DATADIR) fails loudly instead of being ignored. Add a name here when you read one.
OTHER_ENV_VARS: Final[frozenset[str]] = frozenset({CONFIG_ENV_VAR})

DURABILITY_CHOICES: Final[tuple[str, ...]] = ("fsync", "relaxed")
LOG_LEVEL_CHOICES: Final[tuple[str, ...]] = ("debug", "info", "warning", "error")
_BOOL_WORDS: Final[Mapping[str, bool]] = {
    "true": True, "1": True, "yes": True, "on": True,
    "false": False, "0": False, "no": False, "off": False,
}  # fmt: skip


class ConfigError(ValueError):
    """A setting is unknown or has a bad value. The message names the setting and where the value came from."""


def _setting(default: Any, doc: str, *, choices: tuple[str, ...] = (), minimum: int = 0) -> Any:
    """A dataclass field with its one-line doc, its allowed choices (for str) and its minimum (for int)."""
    assert doc and "\n" not in doc, "a setting's doc is one line"
    return field(default=default, metadata={"doc": doc, "choices": choices, "minimum": minimum})


@dataclass(frozen=True, slots=True)
class Settings:
    # The gRPC server.
    listen: str = _setting("127.0.0.1:50051", "Address to serve gRPC on, HOST:PORT; port 0 picks a free port (logged).")
    # The engine: names and defaults as in spendgate._core.Engine.
    data_dir: str = _setting(
        "./spendgate-data", "Directory of the LMDB environment, created if missing; one sidecar process per directory."
    )
    map_size_mb: int = _setting(1024, "LMDB map size: the most the data may grow to, in MiB.", minimum=1)
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
    max_outbox_entries: int = _setting(
        10_000_000,
        "Committed usages waiting for settlement to Stripe; at the bound new Reserves fail (commits still go in).",
        minimum=1,
    )
    # The gRPC server, again.
    max_message_bytes: int = _setting(4 * 1024 * 1024, "Largest gRPC message received or sent.", minimum=1)
    max_concurrent_rpcs: int = _setting(10_000, "RPCs in flight at once; more get RESOURCE_EXHAUSTED.", minimum=1)
    shutdown_grace_ms: int = _setting(5_000, "On SIGTERM or SIGINT, how long in-flight RPCs may take to finish.")
    reflection: bool = _setting(True, "Serve gRPC server reflection (for grpcurl and similar tools).")
    log_level: str = _setting("info", "Log level: debug, info, warning or error.", choices=LOG_LEVEL_CHOICES)

    def __post_init__(self) -> None:
        # Every way in (load_settings, the CLI, tests) ends here: a Settings that exists is valid.
        for spec in dataclasses.fields(self):
            problem = _problem(spec, getattr(self, spec.name))
            if problem is not None:
                raise ConfigError(f"setting {spec.name!r}: {problem}")

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of spendgate._core.Engine(data_dir, **kwargs)."""
        return {name: getattr(self, name) for name in ENGINE_SETTINGS}


# Settings passed to the engine as keyword arguments (data_dir is its positional argument).
ENGINE_SETTINGS: Final[tuple[str, ...]] = (
    "map_size_mb",
    "durability",
    "default_ttl_ms",
    "max_ttl_ms",
    "max_holds_per_budget",
    "max_active_holds",
    "max_budgets",
    "write_queue_capacity",
    "reap_interval_ms",
    "resolved_retention_ms",
    "max_outbox_entries",
)

FIELDS: Final[Mapping[str, dataclasses.Field[Any]]] = {f.name: f for f in dataclasses.fields(Settings)}
assert set(ENGINE_SETTINGS) <= set(FIELDS)


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


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
    if kind is str and not value:
        return "expected a non-empty string"
    return None


def _type_word(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean"}[kind]


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
    path = config_file if config_file is not None else env.get(CONFIG_ENV_VAR) or None
    if path is not None:
        values.update(read_config_file(Path(path)))
    values.update(read_env(env))
    for name, value in (flags or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r} given as a flag")
        if value is not None:
            values[name] = value
    return Settings(**values)


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as SPENDGATE_<NAME> variables. Any other SPENDGATE_* variable is an error."""
    by_var = {env_var(name): name for name in FIELDS}
    values: dict[str, Any] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV_VARS:
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
    """The settings in a TOML file: top-level `name = value` pairs, TOML-typed (numbers unquoted)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror or error}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for key, value in document.items():
        where = f"config file {path}{_line_of(text, key)}"
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown setting {key!r}; known settings: {', '.join(FIELDS)}")
        problem = _problem(FIELDS[key], value)
        if problem is not None:
            raise ConfigError(f"{where}: setting {key!r}: {problem}")
        values[key] = value
    return values


def _line_of(text: str, key: str) -> str:
    """' line N' where `key = ...` (or a [key] table) is in the TOML text; '' if it cannot be found."""
    quoted = re.escape(key)
    pattern = re.compile(rf"""^\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*=|^\s*\[+\s*{quoted}\s*[\].]""")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return f" line {number}"
    return ""


def settings_table_markdown() -> str:
    """The settings as a Markdown table (for the README)."""
    rows = ["| Setting | Flag | Environment variable | Default | Meaning |", "| --- | --- | --- | --- | --- |"]
    for name, spec in FIELDS.items():
        default = spec.default
        shown = str(default).lower() if isinstance(default, bool) else f"{default:_}" if isinstance(default, int) else default
        flags = f"`{flag(name)}`, `--no-{flag(name)[2:]}`" if isinstance(default, bool) else f"`{flag(name)}`"
        rows.append(f"| `{name}` | {flags} | `{env_var(name)}` | `{shown}` | {doc(name)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table_markdown(), end="")
