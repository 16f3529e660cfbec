"""Who may use the HTTP port, through real sidecars over real HTTP and HTTPS (certificates made by the test): every
route without credentials, with wrong ones and with the right ones, under tokens, under mTLS and under both; the Host
check without tokens; sessions (sign-in, sign-out, expiry, the Origin check); the security headers; and the refusal
to serve the page unauthenticated on a non-loopback address."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import ssl
from pathlib import Path
from typing import Final

import aiohttp
import grpc
import pytest

from spendgate.alerts import START_SEQ_METADATA_KEY
from spendgate.client import AsyncClient, Client, NotFound, Unauthenticated
from spendgate.config import Settings
from spendgate.server.app import Sidecar
from spendgate.server.http_guard import host_allowed, same_origin
from spendgate.server.security import Tokens, check_exposure
from spendgate.server.sessions import Sessions
from spendgate.testing.fake_stripe import sign_payload
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.e2e._support import wait_until
from tests.python.server._alerting import WATCH_DEADLINE_S, Alerting, stream_error

from ._certs import Certs, make_certs
from .test_app import settings_for
from .test_security import ADMIN_TOKEN, APP_TOKEN, run

WRONG_TOKEN: Final[str] = "wrong-0123456789abcdef0123456789"
WEBHOOK_SECRET: Final[str] = "whsec_0123456789abcdef"
REFUSED: Final[str] = "TLS refused"  # the handshake (or the first read after it) failed: no HTTP status at all
# Every route that shows customers' money, and /metrics (with metrics_require_token).
GUARDED_ROUTES: Final[tuple[str, ...]] = ("/", "/budgets?q=acme", "/customers/acme", "/metrics")
# What only the real answer holds (the sign-in page repeats the path, so not the customer id).
PAGE_MARKERS: Final[dict[str, str]] = {
    "/": "cus_SECRET_acme",
    "/budgets?q=acme": "cus_SECRET_acme",
    "/customers/acme": "cus_SECRET_acme",
    "/metrics": "spendgate_budgets",
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@dataclasses.dataclass(frozen=True)
class Caller:
    """What a client presents: a client certificate (by the Certs names), and a token as a Bearer header."""

    name: str
    cert: str | None = None  # "client" (signed by the client CA) or "stranger" (another CA)
    token: str | None = None


def page_settings(tmp_path: Path, certs: Certs, *, tokens: bool, mtls: bool, **more: object) -> Settings:
    tls = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)} if mtls else {}
    if mtls:
        tls["tls_client_ca_file"] = str(certs.ca)
    keys = {"app_tokens": APP_TOKEN, "admin_tokens": ADMIN_TOKEN} if tokens else {}
    return settings_for(tmp_path, http_listen="127.0.0.1:0", metrics_require_token=True, **tls, **keys, **more)


def client_ssl(certs: Certs, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if cert is not None:
        context.load_cert_chain(str(getattr(certs, f"{cert}_cert")), str(getattr(certs, f"{cert}_key")))
    return context


async def fetch(
    sidecar: Sidecar,
    certs: Certs,
    caller: Caller,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: dict[str, str] | str | None = None,
) -> tuple[int | str, str, dict[str, str]]:
    """(status or REFUSED, body, headers) of one request from `caller`; redirects are not followed."""
    tls = sidecar.settings.tls_cert_file != ""
    url = f"{'https' if tls else 'http'}://{sidecar.http_address}{path}"
    sent = dict(headers or {})
    if caller.token is not None:
        sent["Authorization"] = f"Bearer {caller.token}"
    ssl_option: ssl.SSLContext | bool = client_ssl(certs, caller.cert) if tls else False
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, headers=sent, data=data, ssl=ssl_option, allow_redirects=False) as response,
        ):
            return response.status, await response.text(), dict(response.headers)
    except (aiohttp.ClientError, ssl.SSLError) as error:
        if caller.cert == "stranger":
            return REFUSED, str(error), {}
        raise


async def seed(sidecar: Sidecar, certs: Certs) -> None:
    """One budget, through the gRPC port with whatever that port needs."""
    tls = sidecar.settings.tls_cert_file != ""
    options: dict[str, object] = {"token": ADMIN_TOKEN} if sidecar.tokens.enabled else {}
    if tls:
        options.update(
            root_certificates=certs.read("ca"),
            private_key=certs.read("client_key"),
            certificate_chain=certs.read("client_cert"),
        )
    async with AsyncClient(sidecar.address, **options) as client:  # type: ignore[arg-type]
        await client.set_budget("acme", 1_000, "cus_SECRET_acme")


def matrix(settings: Settings, certs: Certs, callers: list[Caller]) -> dict[tuple[str, str], int | str]:
    """{(caller, route): status} for every guarded route, plus whether a 200 showed the data."""

    async def body(sidecar: Sidecar) -> dict[tuple[str, str], int | str]:
        await seed(sidecar, certs)
        seen: dict[tuple[str, str], int | str] = {}
        for caller in callers:
            for route in GUARDED_ROUTES:
                status, text, _ = await fetch(sidecar, certs, caller, route)
                seen[(caller.name, route)] = status
                assert (status == 200) == (PAGE_MARKERS[route] in text), (caller, route, status)  # data only on 200
        return seen

    return run(settings, body)


def expect(seen: dict[tuple[str, str], int | str], caller: str, status: int | str) -> None:
    got = {route: seen[(caller, route)] for route in GUARDED_ROUTES}
    assert got == dict.fromkeys(GUARDED_ROUTES, status), (caller, got)


# -- the matrix: tokens, mTLS, both ---------------------------------------------------------------------------------


def test_under_tokens_every_route_needs_an_admin_token(tmp_path: Path, certs: Certs) -> None:
    callers = [
        Caller("none"),
        Caller("wrong", token=WRONG_TOKEN),
        Caller("app", token=APP_TOKEN),
        Caller("admin", token=ADMIN_TOKEN),
    ]
    seen = matrix(page_settings(tmp_path, certs, tokens=True, mtls=False), certs, callers)
    for caller in ("none", "wrong", "app"):
        expect(seen, caller, 401)
    expect(seen, "admin", 200)


def test_under_mtls_every_route_needs_a_client_certificate_signed_by_the_client_ca(
    tmp_path: Path, certs: Certs
) -> None:
    # The audit's open configuration: a server certificate, a client CA and no tokens. The page answered 200 to
    # anyone; now it needs what the gRPC port needs.
    callers = [
        Caller("none"),
        Caller("stranger", cert="stranger"),
        Caller("token only", token=ADMIN_TOKEN),
        Caller("client", cert="client"),
    ]
    seen = matrix(page_settings(tmp_path, certs, tokens=False, mtls=True), certs, callers)
    expect(seen, "none", 403)
    expect(seen, "token only", 403)  # no tokens are configured: a token is no credential here
    expect(seen, "stranger", REFUSED)  # a certificate from another CA fails the handshake, as on the gRPC port
    expect(seen, "client", 200)


def test_under_both_every_route_needs_the_certificate_and_the_admin_token(tmp_path: Path, certs: Certs) -> None:
    callers = [
        Caller("none"),
        Caller("cert only", cert="client"),
        Caller("token only", token=ADMIN_TOKEN),
        Caller("cert and app token", cert="client", token=APP_TOKEN),
        Caller("stranger and admin token", cert="stranger", token=ADMIN_TOKEN),
        Caller("cert and admin token", cert="client", token=ADMIN_TOKEN),
    ]
    seen = matrix(page_settings(tmp_path, certs, tokens=True, mtls=True), certs, callers)
    expect(seen, "none", 403)
    expect(seen, "token only", 403)
    expect(seen, "cert only", 401)
    expect(seen, "cert and app token", 401)
    expect(seen, "stranger and admin token", REFUSED)
    expect(seen, "cert and admin token", 200)


def test_under_mtls_a_signed_in_session_also_needs_the_certificate(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> tuple[int | str, int | str, int | str]:
        client = Caller("client", cert="client")
        signed_in = await fetch(
            sidecar, certs, client, "/login", method="POST", data={"token": ADMIN_TOKEN, "next": "/"}
        )
        cookie = _session_cookie(signed_in[2])
        with_cert = await fetch(sidecar, certs, client, "/", headers={"Cookie": cookie})
        without = await fetch(sidecar, certs, Caller("none"), "/", headers={"Cookie": cookie})
        return signed_in[0], with_cert[0], without[0]

    assert run(page_settings(tmp_path, certs, tokens=True, mtls=True), body) == (303, 200, 403)


def test_the_stripe_webhook_and_an_open_metrics_need_no_certificate_on_the_shared_port(
    tmp_path: Path, certs: Certs
) -> None:
    """Stripe holds no client certificate: its route is authenticated by its signature, also under mTLS and tokens."""
    event = json.dumps(
        {
            "id": "evt_http_access",
            "object": "event",
            "type": "customer.created",
            "data": {"object": {"id": "cus_x", "object": "customer"}},
        }
    )

    async def body(sidecar: Sidecar) -> dict[str, int | str]:
        anonymous = Caller("none")
        unsigned = await fetch(sidecar, certs, anonymous, "/stripe/webhook", method="POST", data={"x": "y"})
        signed = await fetch(
            sidecar,
            certs,
            anonymous,
            "/stripe/webhook",
            method="POST",
            data=event,
            headers={"Stripe-Signature": sign_payload(event, WEBHOOK_SECRET), "Content-Type": "application/json"},
        )
        metrics = await fetch(sidecar, certs, anonymous, "/metrics")
        page = await fetch(sidecar, certs, anonymous, "/")
        return {"unsigned": unsigned[0], "signed": signed[0], "metrics": metrics[0], "page": page[0]}

    settings = dataclasses.replace(
        page_settings(tmp_path, certs, tokens=True, mtls=True),
        metrics_require_token=False,
        webhook_listen="127.0.0.1:0",
        webhook_secret=WEBHOOK_SECRET,
    )
    settings = dataclasses.replace(settings, webhook_listen=settings.http_listen)
    assert run(settings, body) == {"unsigned": 400, "signed": 200, "metrics": 200, "page": 403}


# -- refusing the open configuration ------------------------------------------------------------------------------


def test_the_page_unauthenticated_on_a_non_loopback_address_is_refused_even_with_the_insecure_flag(
    tmp_path: Path,
) -> None:
    from ..test_cli import spendgate_cli

    config = tmp_path / "open.toml"
    config.write_text('http_listen = "0.0.0.0:9100"\nallow_insecure_non_loopback = true\n')
    checked = spendgate_cli("check-config", str(config))
    assert checked.returncode == 2, checked
    assert "operator page on it would show every customer's spend" in checked.stderr
    assert "--no-http-operator-page" in checked.stderr

    served = spendgate_cli(
        "serve", "--http-listen", "0.0.0.0:0", "--allow-insecure-non-loopback", "--data-dir", str(tmp_path / "data")
    )
    assert served.returncode == 2 and "operator page on it would show every customer's spend" in served.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened or bound

    metrics_only = tmp_path / "metrics-only.toml"
    metrics_only.write_text(config.read_text() + "http_operator_page = false\n")
    assert spendgate_cli("check-config", str(metrics_only)).returncode == 0


def test_mtls_or_tokens_on_a_non_loopback_address_pass_the_exposure_check(certs: Certs) -> None:
    tls = {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key)}
    check_exposure(
        Settings(listen="0.0.0.0:1", http_listen="0.0.0.0:2", tls_client_ca_file=str(certs.ca), **tls), Tokens()
    )
    check_exposure(Settings(listen="0.0.0.0:1", http_listen="0.0.0.0:2", **tls), Tokens(admin=(ADMIN_TOKEN.encode(),)))
    check_exposure(
        Settings(http_listen="0.0.0.0:2", allow_insecure_non_loopback=True, http_operator_page=False), Tokens()
    )


def test_a_route_is_off_with_the_operator_page(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> tuple[int | str, int | str]:
        return (await fetch(sidecar, certs, Caller("none"), "/"))[0], (
            await fetch(sidecar, certs, Caller("none"), "/metrics")
        )[0]

    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", http_operator_page=False)
    assert run(settings, body) == (404, 200)


# -- the Host check ---------------------------------------------------------------------------------------------------


def test_without_tokens_a_foreign_host_is_refused_naming_the_setting(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> dict[str, tuple[int | str, str]]:
        port = sidecar.http_address.rpartition(":")[2]
        seen = {}
        for host in (
            "rebind.attacker.example",
            "127.0.0.1",
            "localhost",
            "[::1]",
            "app.localhost",
            "spendgate.internal",
            "SPENDGATE.internal.",
        ):
            status, text, _ = await fetch(sidecar, certs, Caller("none"), "/", headers={"Host": f"{host}:{port}"})
            seen[host] = (status, text)
        status, text, _ = await fetch(
            sidecar, certs, Caller("none"), "/metrics", headers={"Host": "rebind.attacker.example"}
        )
        seen["metrics"] = (status, text)
        status, text, _ = await fetch(
            sidecar,
            certs,
            Caller("none"),
            "/login",
            method="POST",
            headers={"Host": "rebind.attacker.example"},
            data={"next": "/"},
        )
        seen["login"] = (status, text)
        return seen

    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", http_allowed_hosts="spendgate.internal")
    seen = run(settings, body)
    status, text = seen.pop("rebind.attacker.example")
    assert status == 421 and "http_allowed_hosts" in text and "rebind.attacker.example" in text
    assert seen.pop("login")[0] == 421
    assert seen.pop("metrics")[0] == 200  # no customer data: a scraper may use any name
    assert {host: status for host, (status, _) in seen.items()} == dict.fromkeys(seen, 200)


def test_with_tokens_the_host_does_not_matter(tmp_path: Path, certs: Certs) -> None:
    """A rebinding page cannot send the operator's session cookie (SameSite=Strict, another site) nor its token."""

    async def body(sidecar: Sidecar) -> tuple[int | str, int | str]:
        foreign = {"Host": "spendgate.example"}
        return (
            (await fetch(sidecar, certs, Caller("none"), "/", headers=foreign))[0],
            (await fetch(sidecar, certs, Caller("admin", token=ADMIN_TOKEN), "/", headers=foreign))[0],
        )

    assert run(page_settings(tmp_path, certs, tokens=True, mtls=False), body) == (401, 200)


def test_host_parsing() -> None:
    none: frozenset[str] = frozenset()
    for host in ("127.0.0.1:9100", "127.9.9.9", "[::1]:9100", "localhost", "LOCALHOST:1", "a.b.localhost:9"):
        assert host_allowed(host, none), host
    for host in ("evil.example:9100", "127.0.0.1.evil.example", "[::2]:1", "localhost.evil.example", "0.0.0.0", ""):
        assert not host_allowed(host, none), host
    assert host_allowed("app.internal:443", frozenset({"app.internal"}))


# -- sessions -------------------------------------------------------------------------------------------------------


def _session_cookie(headers: dict[str, str]) -> str:
    """`spendgate_session=<id>` from a Set-Cookie header."""
    value = headers["Set-Cookie"]
    assert value.startswith("spendgate_session="), value
    return value.split(";")[0]


def test_sign_out_ends_the_session_on_the_server_so_a_copied_cookie_is_dead_too(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> dict[str, object]:
        anonymous, seen = Caller("none"), {}
        status, _, headers = await fetch(
            sidecar, certs, anonymous, "/login", method="POST", data={"token": ADMIN_TOKEN, "next": "/budgets"}
        )
        seen["login"] = (status, headers.get("Location"), headers["Set-Cookie"])
        cookie = {"Cookie": _session_cookie(headers)}
        status, page, _ = await fetch(sidecar, certs, anonymous, "/", headers=cookie)
        seen["signed in"] = (status, "Sign out" in page)
        status, _, headers = await fetch(sidecar, certs, anonymous, "/logout", method="POST", headers=cookie)
        seen["logout"] = (status, headers.get("Location"), headers.get("Set-Cookie", ""))
        seen["after"] = (await fetch(sidecar, certs, anonymous, "/", headers=cookie))[0]
        return seen

    seen = run(page_settings(tmp_path, certs, tokens=True, mtls=False), body)
    status, location, set_cookie = seen["login"]  # type: ignore[misc]
    assert status == 303 and location == "/budgets"
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Max-Age=43200" in set_cookie
    assert ADMIN_TOKEN not in set_cookie
    assert seen["signed in"] == (200, True)
    status, location, cleared = seen["logout"]  # type: ignore[misc]
    assert status == 303 and location == "/" and "Max-Age=0" in cleared
    assert seen["after"] == 401  # the same cookie value, sent again: its session is gone


def test_a_session_expires_after_http_session_ttl_ms(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> tuple[str, int | str]:
        _, _, headers = await fetch(
            sidecar, certs, Caller("none"), "/login", method="POST", data={"token": ADMIN_TOKEN}
        )
        await asyncio.sleep(1.2)  # past the TTL on the monotonic clock: the session can only be over
        return headers["Set-Cookie"], (
            await fetch(sidecar, certs, Caller("none"), "/", headers={"Cookie": _session_cookie(headers)})
        )[0]

    settings = page_settings(tmp_path, certs, tokens=True, mtls=False, http_session_ttl_ms=1_000)
    set_cookie, status = run(settings, body)
    assert "Max-Age=1;" in set_cookie + ";" and status == 401


def test_under_tls_the_session_cookie_is_secure(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> str:
        return (
            await fetch(
                sidecar, certs, Caller("client", cert="client"), "/login", method="POST", data={"token": ADMIN_TOKEN}
            )
        )[2]["Set-Cookie"]

    assert "Secure" in run(page_settings(tmp_path, certs, tokens=True, mtls=True), body)


def test_sign_in_and_sign_out_refuse_a_form_from_another_origin(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> dict[str, tuple[int | str, bool]]:
        own = f"http://{sidecar.http_address}"
        cases = {
            "evil origin": {"Origin": "https://evil.example"},
            "null origin": {"Origin": "null"},
            "cross-site fetch": {"Sec-Fetch-Site": "cross-site"},
            "own origin": {"Origin": own, "Sec-Fetch-Site": "same-origin"},
            "a script": {},
        }
        seen = {}
        for name, headers in cases.items():
            status, _, got = await fetch(
                sidecar, certs, Caller("none"), "/login", method="POST", headers=headers, data={"token": ADMIN_TOKEN}
            )
            seen[name] = (status, "Set-Cookie" in got)
        status, _, _ = await fetch(
            sidecar, certs, Caller("none"), "/logout", method="POST", headers={"Origin": "https://evil.example"}
        )
        seen["logout from evil"] = (status, False)
        return seen

    assert run(page_settings(tmp_path, certs, tokens=True, mtls=False), body) == {
        "evil origin": (403, False),
        "null origin": (403, False),
        "cross-site fetch": (403, False),
        "own origin": (303, True),
        "a script": (303, True),
        "logout from evil": (403, False),
    }


def test_a_session_lives_only_while_its_token_is_configured_and_until_its_ttl() -> None:
    """Rotating a token ends its sessions; the TTL and the bound on sessions run on the store's clock."""
    now = [100.0]
    sessions = Sessions(ttl_ms=10_000, max_sessions=2, clock=lambda: now[0])
    old, new = b"admin-old-0123456789abcdef", b"admin-new-0123456789abcdef"
    by_old, by_new = sessions.create(old), sessions.create(new)
    both = Tokens(admin=(old, new))
    assert sessions.valid(by_old, both) and sessions.valid(by_new, both)
    rotated = Tokens(admin=(new,))
    assert not sessions.valid(by_old, rotated) and sessions.valid(by_new, rotated)
    assert not sessions.valid(by_old, both)  # ended for good, not only while the token is missing
    assert not sessions.valid(by_new, Tokens(app=(new,)))  # an app token never holds a session
    now[0] += 10.0  # by_new's TTL is over
    assert not sessions.valid(by_new, rotated)
    assert sessions.valid(sessions.create(new), rotated) and len(sessions) == 1
    assert not sessions.valid("not-a-session", rotated) and not sessions.valid("x" * 10_000, rotated)


def test_sign_ins_past_http_max_sessions_end_the_oldest_session() -> None:
    sessions = Sessions(ttl_ms=60_000, max_sessions=2, clock=lambda: 0.0)
    token = b"admin-0123456789abcdef0123"
    tokens = Tokens(admin=(token,))
    first, second, third = (sessions.create(token) for _ in range(3))
    assert len(sessions) == 2
    assert not sessions.valid(first, tokens) and sessions.valid(second, tokens) and sessions.valid(third, tokens)
    assert sessions.end(second) and not sessions.end(second) and not sessions.valid(second, tokens)


def test_same_origin_rules() -> None:
    assert same_origin(origin=None, fetch_site=None, scheme="http", host="127.0.0.1:1")
    assert same_origin(origin="HTTP://127.0.0.1:1", fetch_site="same-origin", scheme="http", host="127.0.0.1:1")
    assert not same_origin(origin="https://127.0.0.1:1", fetch_site=None, scheme="http", host="127.0.0.1:1")
    assert not same_origin(origin="http://127.0.0.1:1", fetch_site="same-site", scheme="http", host="127.0.0.1:1")


# -- security headers ---------------------------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> dict[str, dict[str, str]]:
        anonymous, admin = Caller("none"), Caller("admin", token=ADMIN_TOKEN)
        return {
            path: (await fetch(sidecar, certs, caller, path))[2]
            for caller, path in (
                (admin, "/"),
                (anonymous, "/"),
                (admin, "/customers/nobody"),
                (admin, "/metrics"),
                (anonymous, "/no-such-route"),
            )
        }

    for framing, expected_frame in (
        ({}, "frame-ancestors 'none'"),
        ({"http_frame_ancestors": "'self' https://app.example.com"}, "frame-ancestors 'self' https://app.example.com"),
    ):
        settings = page_settings(tmp_path / str(len(framing)), certs, tokens=True, mtls=False, **framing)
        for path, headers in run(settings, body).items():
            policy = headers["Content-Security-Policy"]
            assert policy.startswith("default-src 'none'; style-src 'sha256-"), (path, policy)
            assert "unsafe-inline" not in policy and "script-src" not in policy  # no script at all
            assert policy.endswith(expected_frame), policy
            assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "same-origin"
            assert headers.get("X-Frame-Options") == ("DENY" if not framing else None)


# -- rotating a token -----------------------------------------------------------------------------------------------


def test_rotating_an_admin_token_with_sighup_ends_its_sessions(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    old, new = "admin-old-0123456789abcdef012345", "admin-new-0123456789abcdef012345"
    admin_file = tmp_path / "admin-tokens"
    admin_file.write_text(old + "\n")
    sidecar = sidecar_factory("rotate", http=True, extra_args=["--admin-tokens-file", str(admin_file)])

    async def request(method: str, path: str, **kwargs: object) -> tuple[int, dict[str, str]]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{sidecar.http_url}{path}", allow_redirects=False, **kwargs) as response,
        ):  # type: ignore[arg-type]
            return response.status, dict(response.headers)

    def sign_in(token: str) -> str:
        status, headers = asyncio.run(request("POST", "/login", data={"token": token}))
        assert status == 303, status
        return _session_cookie(headers)

    def page(*, cookie: str | None = None, token: str | None = None) -> int:
        headers = {"Cookie": cookie} if cookie else {"Authorization": f"Bearer {token}"}
        return asyncio.run(request("GET", "/", headers=headers))[0]

    def rotate(text: str) -> None:
        admin_file.write_text(text)
        os.kill(sidecar.pid, signal.SIGHUP)

    by_old = sign_in(old)
    assert page(cookie=by_old) == 200
    conn = Alerting(sidecar.target)
    stream = conn.budget.WatchAlerts(
        pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S, metadata=(("authorization", f"Bearer {old}"),)
    )
    assert START_SEQ_METADATA_KEY in dict(stream.initial_metadata() or ())
    rotate(new + "\n")
    wait_until(lambda: page(token=old), lambda status: status == 401, what="the old token to stop working")
    assert page(cookie=by_old) == 401  # the session made from the removed token is over
    _, ended = stream_error(stream)  # and so is a WatchAlerts stream opened with it
    conn.close()
    assert (
        ended.code() == grpc.StatusCode.UNAUTHENTICATED and "no longer one of the sidecar's tokens" in ended.details()
    )
    assert page(token=new) == 200 and page(cookie=sign_in(new)) == 200
    with Client(sidecar.target, token=old) as gone, pytest.raises(Unauthenticated):
        gone.balance("nobody")  # the gRPC port follows the same reload
    with Client(sidecar.target, token=new) as current, pytest.raises(NotFound):
        current.balance("nobody")

    rotate("")  # an empty file: refused, the tokens in force stay
    wait_until(lambda: "tokens not reloaded" in sidecar.log_tail(50), lambda seen: seen, what="the refused reload")
    assert page(token=new) == 200
