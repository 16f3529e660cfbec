"""The sidecar's logs: JSON lines (or text for people), request ids, and secrets kept out.

    configure_logging("info", "json", secrets=secret_values(settings))
    token = request_id.set("req-123")      # the gRPC interceptor does this per call
    log.info("reserved", extra={"customer_id": "cus_1"})
    # {"ts": "2026-12-01T20:00:00.123Z", "level": "info", "logger": "spendgate", "msg": "reserved",
    #  "request_id": "req-123", "customer_id": "cus_1"}

Redaction runs on every record before it is formatted, in a filter on the handler: the values of settings marked
secret (Stripe keys, webhook secrets, tokens), anything shaped like a Stripe key (`sk_...`, `rk_...`, `whsec_...`) and
`Bearer <token>` become `[REDACTED]`, in the message, its arguments, extra fields and tracebacks alike.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "add_secrets",
    "configure_logging",
    "redact",
    "request_id",
    "secret_values",
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("spendgate_request_id", default="")
# The filter of the handler configure_logging installed, so that secrets read later (token files) join it.
_active_filter: RedactingFilter | None = None

REDACTED: Final[str] = "[REDACTED]"
# Stripe's key and secret shapes, and bearer credentials. The lookbehind keeps ids such as `task_...` intact.
SECRET_PATTERNS: Final[tuple[re.Pattern[str], ...]] = (
    re.compile(r"(?<![A-Za-z0-9])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]+"),
    re.compile(r"(?<![A-Za-z0-9])(?:sk|rk)_[A-Za-z0-9]{8,}"),
    re.compile(r"(?<![A-Za-z0-9])whsec_[A-Za-z0-9]+"),
    re.compile(r"(?i)\bbearer\s+[^\s,;'\"]+"),
)
# A secret shorter than this is not searched for literally (it would redact ordinary words).
MIN_SECRET_CHARS: Final[int] = 6
TEXT_FORMAT: Final[str] = "%(asctime)s %(levelname)s %(name)s%(request_suffix)s: %(message)s"
# The attributes every LogRecord has: whatever else a record carries came from `extra=` and goes into the JSON.
_STANDARD_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_suffix", "taskName"}
)


def secret_values(settings: Any) -> list[str]:
    """The values of the settings marked secret (tokens split at commas), for RedactingFilter."""
    import dataclasses  # noqa: PLC0415

    values = []
    for spec in dataclasses.fields(settings):
        if spec.metadata.get("secret"):
            values += [part.strip() for part in str(getattr(settings, spec.name)).split(",") if part.strip()]
    return values


def redact(text: str, literals: Iterable[str] = ()) -> str:
    for literal in literals:
        text = text.replace(literal, REDACTED)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record so that no secret reaches any formatter: the message is rendered and redacted, extra
    string fields and the traceback too."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so that a secret containing another is replaced whole.
        self._literals = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self._literals = sorted(
            {*self._literals, *(s for s in secrets if len(s) >= MIN_SECRET_CHARS)}, key=len, reverse=True
        )

    def filter(self, record: logging.LogRecord) -> bool:
        # Stamped here, at emit time, in the context of the call that logged (a formatter may run later).
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        record.msg = redact(record.getMessage(), self._literals)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._literals)
        record.exc_info = None  # formatted (and redacted) above: formatters use exc_text
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRIBUTES and isinstance(value, str):
                setattr(record, key, redact(value, self._literals))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ms), level, logger, msg, request_id (when in a call), extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = getattr(record, "request_id", "") or request_id.get()
        if current:
            line["request_id"] = current
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in line and key != "request_id":
                line[key] = value
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        current = getattr(record, "request_id", "") or request_id.get()
        record.request_suffix = f" [{current}]" if current else ""
        return super().format(record)


def configure_logging(level: str, log_format: str = "text", *, secrets: Iterable[str] = ()) -> RedactingFilter:
    """Log to stderr at `level` in `log_format` ("json" or "text"), redacting `secrets`. Replaces earlier handlers of
    the root logger (so that calling it twice does not log twice). Returns the filter, to add secrets later."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter(TEXT_FORMAT))
    redacting = RedactingFilter(secrets)
    handler.addFilter(redacting)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global _active_filter  # noqa: PLW0603 - one process, one log configuration
    _active_filter = redacting
    return redacting


def add_secrets(secrets: Iterable[str]) -> None:
    """Redact these too from now on (tokens read from files at start). Does nothing before configure_logging."""
    if _active_filter is not None:
        _active_filter.add_secrets(secrets)
