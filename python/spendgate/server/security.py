"""Who may talk to the sidecar, and over what: bearer tokens by role, TLS and mTLS, and the safe-by-default rule.

    tokens = load_tokens(settings)                 # reads app_tokens(_file) and admin_tokens(_file); ConfigError
    check_exposure(settings, tokens)               # refuses a non-loopback listen without TLS and client auth
    credentials = server_credentials(settings)     # grpc.ServerCredentials, or None for plaintext
    tokens.role_of("Bearer ...")                   # Role.ADMIN, Role.APP, or None

Roles: an app token may call spendgate.v1.Budget; an admin token may call Budget and Admin (and see the operator page).
Health and reflection stay open, so that probes and grpcurl work without a token. With no token configured, every
call is allowed (the default, on loopback).

The safe default: the sidecar listens on 127.0.0.1. On any other address it needs TLS (tokens and money data must not
cross a network in plaintext) and a way to tell clients apart (tokens, or mTLS client certificates), unless
`allow_insecure_non_loopback` says otherwise. The same holds for `http_listen` (the operator page and /metrics), and
the operator page on a non-loopback address needs tokens or mTLS in every case (check_page_exposure).
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from spendgate.config import ConfigError, Settings, flag

# A token shorter than this is guessable; longer ones are what `openssl rand -hex 32` gives.
MIN_TOKEN_CHARS: Final[int] = 16
BEARER_PREFIX: Final[str] = "bearer "
LOOPBACK_NAMES: Final[frozenset[str]] = frozenset({"localhost", "ip6-localhost"})
HOW_TO_MAKE_A_TOKEN: Final[str] = "make one with `openssl rand -hex 32`"


class Role(enum.Enum):
    APP = "app"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Tokens:
    """The configured tokens, as bytes for hmac.compare_digest. Empty: tokens are off."""

    app: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.app or self.admin)

    def role_of(self, authorization: str | None) -> Role | None:
        """The role of an `authorization` header or metadata value ("Bearer <token>"), None if it names no token.
        Every configured token is compared, in constant time, so that the time taken says nothing about which."""
        if not authorization or not authorization[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return None
        presented = authorization[len(BEARER_PREFIX) :].strip().encode("utf-8", "replace")
        is_admin = _matches_any(presented, self.admin)
        is_app = _matches_any(presented, self.app)
        if is_admin:
            return Role.ADMIN
        return Role.APP if is_app else None


class TokenSource:
    """The tokens in force, re-read from the settings (and their files) by reload(): rotating a token without a
    restart. Everything that checks tokens reads `current` per request, so a reload takes effect at once, and an
    operator page session made from a removed token ends with it (spendgate.server.sessions)."""

    def __init__(self, settings: Settings, tokens: Tokens) -> None:
        self._settings = settings
        self.current = tokens

    def reload(self) -> Tokens:
        """Read the tokens again. Raises ConfigError (and keeps the old ones) for a bad file, or for a change that
        would turn tokens on or off: that changes which checks run at all, so it needs a restart."""
        tokens = load_tokens(self._settings)
        if tokens.enabled != self.current.enabled:
            raise ConfigError(
                "a reload cannot turn tokens on or off (it decides which checks run): restart the "
                "sidecar for that; the tokens in force are unchanged"
            )
        self.current = tokens
        return tokens


def _matches_any(presented: bytes, known: tuple[bytes, ...]) -> bool:
    found = False
    for token in known:
        found |= hmac.compare_digest(presented, token)
    return found


def parse_tokens(text: str, source: str) -> tuple[bytes, ...]:
    """Tokens separated by commas or newlines ('#' starts a comment line). Raises ConfigError naming `source`."""
    tokens = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for part in line.split(","):
            token = part.strip()
            if not token:
                continue
            if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
                raise ConfigError(
                    f"{source}: a token of {len(token)} characters is too short or not printable ASCII: tokens need "
                    f">= {MIN_TOKEN_CHARS} printable ASCII characters without spaces; {HOW_TO_MAKE_A_TOKEN}"
                )
            tokens.append(token.encode("ascii"))
    return tuple(tokens)


def load_tokens(settings: Settings) -> Tokens:
    """app_tokens + app_tokens_file, admin_tokens + admin_tokens_file. Raises ConfigError naming the setting."""
    return Tokens(app=_tokens_of(settings, "app_tokens"), admin=_tokens_of(settings, "admin_tokens"))


def _tokens_of(settings: Settings, name: str) -> tuple[bytes, ...]:
    inline = parse_tokens(getattr(settings, name), f"setting {name!r}")
    path: str = getattr(settings, f"{name}_file")
    if not path:
        return inline
    from_file = parse_tokens(_read_text(path, f"{name}_file"), f"setting '{name}_file' ({path})")
    if not from_file:
        raise ConfigError(
            f"setting '{name}_file': {path} holds no token; put one a line ({HOW_TO_MAKE_A_TOKEN})", f"{name}_file"
        )
    return inline + from_file


def _read_text(path: str, setting: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"setting {setting!r}: cannot read {path}: {error.strerror or error}", setting) from None
    except UnicodeDecodeError:
        raise ConfigError(f"setting {setting!r}: {path} is not UTF-8 text (expected PEM or tokens)", setting) from None


def _read_pem(path: str, setting: str) -> bytes:
    text = _read_text(path, setting)
    if "-----BEGIN " not in text:
        raise ConfigError(f"setting {setting!r}: {path} holds no PEM block (-----BEGIN ...); pass a PEM file", setting)
    return text.encode("ascii", "replace")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (mTLS with tls_client_ca_file), or None when TLS is off. The files are
    checked with the ssl module first: gRPC itself only logs that a file is bad and then fails to bind."""
    if not settings.tls_cert_file:
        return None
    _checked_context(settings)
    key = _read_pem(settings.tls_key_file, "tls_key_file")
    chain = _read_pem(settings.tls_cert_file, "tls_cert_file")
    client_ca = _read_pem(settings.tls_client_ca_file, "tls_client_ca_file") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context for the HTTP port from the same certificate, or None when TLS is off.

    With tls_client_ca_file the handshake asks for a client certificate and refuses one that CA did not sign, but lets a
    client without one in (CERT_OPTIONAL): Stripe's webhook (when it shares the port) and an open /metrics have none.
    Every route that needs credentials then checks that the connection carried a verified certificate (ops_http)."""
    if not settings.tls_cert_file:
        return None
    context = _checked_context(settings)
    if settings.tls_client_ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _checked_context(settings: Settings) -> ssl.SSLContext:
    """A server context loaded from the TLS settings; ConfigError naming the setting whose file is unusable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        if getattr(settings, name):
            _read_pem(getattr(settings, name), name)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"setting 'tls_cert_file': {settings.tls_cert_file} with the key {settings.tls_key_file} is "
            f"not a usable certificate and key pair ({error}); pass a PEM certificate chain and its "
            "private key",
            "tls_cert_file",
        ) from None
    if settings.tls_client_ca_file:
        try:
            context.load_verify_locations(settings.tls_client_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"setting 'tls_client_ca_file': {settings.tls_client_ca_file} holds no usable CA certificate ({error})",
                "tls_client_ca_file",
            ) from None
    return context


def host_of(listen: str) -> str:
    """The host part of HOST:PORT, [IPv6]:PORT, :PORT or PORT ('' for the last two)."""
    host, separator, _ = listen.strip().rpartition(":")
    return host.strip("[]") if separator else ""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost. '' means 127.0.0.1 for http_listen, so it is loopback too; a wildcard
    (0.0.0.0, ::) or any other name is not."""
    if host == "" or host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, tokens: Tokens) -> None:
    """Refuse to serve on a non-loopback address without TLS and client authentication, unless told to. Raises
    ConfigError saying what to add."""
    if not settings.allow_insecure_non_loopback:
        _check_transport_exposure(settings, tokens)
    check_page_exposure(settings, tokens)


def _check_transport_exposure(settings: Settings, tokens: Tokens) -> None:
    if settings.proxy_listen and not is_loopback(host_of(settings.proxy_listen)):
        raise ConfigError(
            f"setting 'proxy_listen': {settings.proxy_listen} is not a loopback address, and the proxy serves plain "
            f"HTTP that spends budgets and carries provider keys: listen on 127.0.0.1, or pass "
            f"{flag('allow_insecure_non_loopback')} if something in front of it (a mesh, a firewall) does that job",
            "proxy_listen",
        )
    tls = bool(settings.tls_cert_file)
    client_auth = tokens.enabled or bool(settings.tls_client_ca_file)
    for name in ("listen", "http_listen"):
        address: str = getattr(settings, name)
        if not address or is_loopback(host_of(address)) or (tls and client_auth):
            continue
        missing = " and ".join(
            part
            for part, ok in (
                ("TLS (tls_cert_file, tls_key_file)", tls),
                ("client authentication (app_tokens/admin_tokens, or tls_client_ca_file)", client_auth),
            )
            if not ok
        )
        raise ConfigError(
            f"setting {name!r}: {address} is not a loopback address, and the sidecar has no {missing}: anyone who can "
            f"reach it could spend or read budgets. Configure them, listen on 127.0.0.1, or pass "
            f"{flag('allow_insecure_non_loopback')} if something in front of it (a mesh, a firewall) does that job",
            name,
        )


def check_page_exposure(settings: Settings, tokens: Tokens) -> None:
    """The operator page shows every customer's spend and Stripe ids: on a non-loopback http_listen it needs client
    authentication of its own (tokens, or mTLS client certificates), also with allow_insecure_non_loopback, which
    speaks for the transport (a mesh, a firewall), not for who may read the page. Raises ConfigError saying what to
    do."""
    address = settings.http_listen
    if not address or not settings.http_operator_page or is_loopback(host_of(address)):
        return
    if tokens.enabled or settings.tls_client_ca_file:
        return
    raise ConfigError(
        f"setting 'http_listen': {address} is not a loopback address, and the operator page on it would show every "
        "customer's spend and Stripe ids to anyone who can reach it: configure admin_tokens (or tls_client_ca_file "
        f"for client certificates), listen on 127.0.0.1, or pass --no-{flag('http_operator_page')[2:]} to serve only "
        "/metrics there",
        "http_listen",
    )


def http_access_summary(settings: Settings, tokens: Tokens) -> str:
    """How the operator page is protected, for the start-up log line."""
    needs = [
        part
        for part, on in (
            ("a client certificate", bool(settings.tls_client_ca_file)),
            ("an admin token", tokens.enabled),
        )
        if on
    ]
    if needs:
        return " and ".join(needs)
    return "nothing but a loopback or allowed Host (no tokens: anyone who can reach the port)"


def startup_problems(settings: Settings) -> list[str]:
    """Everything serve would refuse at start without opening the data dir or a port: token and certificate files,
    and the exposure rule. For `spendgate check-config`."""
    problems = []
    tokens = Tokens()
    try:
        tokens = load_tokens(settings)
    except ConfigError as error:
        problems.append(str(error))
    checks: tuple[Callable[[], object], ...] = (
        lambda: server_credentials(settings),
        lambda: check_exposure(settings, tokens),
        lambda: check_usage_link_key(settings),
    )
    for check in checks:
        try:
            check()
        except ConfigError as error:
            problems.append(str(error))
    return problems


def check_usage_link_key(settings: Settings) -> None:
    """A configured usage_link_secret_file must hold a usable key (one the sidecar makes itself is made at start)."""
    from spendgate.service.usage_links import load_or_create_secret  # noqa: PLC0415 - check-config only

    if settings.usage_link_secret_file and settings.http_listen:
        try:
            load_or_create_secret(Path(settings.usage_link_secret_file), create=False)
        except ValueError as error:
            raise ConfigError(f"setting 'usage_link_secret_file': {error}", "usage_link_secret_file") from None
