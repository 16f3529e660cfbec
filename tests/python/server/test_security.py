"""Security through a real server on loopback: tokens by role, TLS and mTLS, the safe default, and its files."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spendgate.client import (
    AsyncClient,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    tls_credentials,
)
from spendgate.config import ConfigError, Settings
from spendgate.server.app import Sidecar
from spendgate.server.security import Role, Tokens, check_exposure, load_tokens, parse_tokens

from ._certs import Certs, make_certs
from .test_app import reflected_services, settings_for

T = TypeVar("T")
HANG_GUARD_S = 60.0
APP_TOKEN = "app-0123456789abcdef0123456789ab"
ADMIN_TOKEN = "admin-0123456789abcdef0123456789"
_NO_RETRY = RetryPolicy(max_attempts=1)  # a refused handshake is UNAVAILABLE: do not retry it


def run(settings: Settings, body: Callable[[Sidecar], Awaitable[T]]) -> T:
    """Start an in-process sidecar, run body(sidecar) under a hang guard, always stop it."""

    async def main() -> T:
        sidecar = Sidecar(settings)
        await sidecar.start()
        try:
            return await asyncio.wait_for(body(sidecar), HANG_GUARD_S)
        finally:
            await sidecar.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def token_settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path, app_tokens=APP_TOKEN, admin_tokens=ADMIN_TOKEN)


# -- tokens ------------------------------------------------------------------------------------------------------------


def test_an_app_token_may_call_budget_and_an_admin_token_may_call_admin_too(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> None:
        async with (
            AsyncClient(sidecar.address, token=ADMIN_TOKEN) as admin,
            AsyncClient(sidecar.address, token=APP_TOKEN) as app,
        ):
            await admin.set_budget("cus_a", 100)
            async with app.reserve("cus_a", 10) as hold:
                await hold.commit(7)
            assert (await admin.balance("cus_a")).spent == 7

    run(token_settings(tmp_path), body)


def test_a_missing_token_is_unauthenticated_and_says_how_to_send_one_and_changes_nothing(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> None:
        async with AsyncClient(sidecar.address) as anonymous, AsyncClient(sidecar.address, token=ADMIN_TOKEN) as admin:
            await admin.set_budget("cus_a", 100)
            with pytest.raises(Unauthenticated) as caught:
                await anonymous.reserve_raw("cus_a", 10)
            assert "authorization: Bearer <token>" in caught.value.message and "token=" in caught.value.message
            with pytest.raises(Unauthenticated):
                await anonymous.set_budget("cus_b", 100)
            balance = await admin.balance("cus_a")
            assert (balance.reserved, balance.active_holds) == (0, 0)
            with pytest.raises(NotFound):
                await admin.balance("cus_b")

    run(token_settings(tmp_path), body)


def test_an_unknown_token_is_unauthenticated_and_is_never_echoed(tmp_path: Path) -> None:
    wrong = "not-a-configured-token-0123456789"

    async def body(sidecar: Sidecar) -> None:
        async with AsyncClient(sidecar.address, token=wrong) as stranger:
            with pytest.raises(Unauthenticated) as caught:
                await stranger.reserve_raw("cus_a", 10)
        assert "not one of the sidecar's app_tokens or admin_tokens" in caught.value.message
        assert wrong not in caught.value.message

    run(token_settings(tmp_path), body)


def test_an_app_token_calling_admin_is_permission_denied_and_creates_nothing(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> None:
        async with (
            AsyncClient(sidecar.address, token=APP_TOKEN) as app,
            AsyncClient(sidecar.address, token=ADMIN_TOKEN) as admin,
        ):
            with pytest.raises(PermissionDenied) as caught:
                await app.set_budget("cus_a", 100)
            assert "admin_tokens" in caught.value.message
            with pytest.raises(NotFound):
                await admin.balance("cus_a")

    run(token_settings(tmp_path), body)


def test_health_and_reflection_stay_open_without_a_token(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> None:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert "spendgate.v1.Budget" in await reflected_services(channel)

    run(token_settings(tmp_path), body)


def test_tokens_come_from_files_too_so_they_stay_out_of_the_process_list(tmp_path: Path) -> None:
    (tmp_path / "app.tokens").write_text(f"# app tokens, one a line\n{APP_TOKEN}\n\nsecond-app-0123456789abcdef\n")
    (tmp_path / "admin.tokens").write_text(f"{ADMIN_TOKEN}\n")
    tokens = load_tokens(
        Settings(app_tokens_file=str(tmp_path / "app.tokens"), admin_tokens_file=str(tmp_path / "admin.tokens"))
    )
    assert tokens.role_of(f"Bearer {APP_TOKEN}") is Role.APP
    assert tokens.role_of("bearer second-app-0123456789abcdef") is Role.APP
    assert tokens.role_of(f"Bearer {ADMIN_TOKEN}") is Role.ADMIN
    assert tokens.role_of(APP_TOKEN) is None  # not "Bearer ..."
    assert tokens.role_of(None) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("short", "too short"),
        ("has space 0123456789abcdef", "too short or not printable"),
    ],
)
def test_a_weak_or_malformed_token_is_refused_naming_the_setting(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"setting 'app_tokens': .*{problem}.*openssl rand -hex 32"):
        load_tokens(Settings(app_tokens=text))


def test_an_empty_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="'admin_tokens_file': .* holds no token"):
        load_tokens(Settings(admin_tokens_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="'admin_tokens_file': cannot read"):
        load_tokens(Settings(admin_tokens_file=str(tmp_path / "absent")))


def test_no_tokens_configured_means_tokens_are_off() -> None:
    assert not Tokens().enabled and parse_tokens(" , \n", "x") == ()


# -- TLS and mTLS ------------------------------------------------------------------------------------------------------


def tls_settings(tmp_path: Path, certs: Certs, *, mtls: bool = False) -> Settings:
    return settings_for(
        tmp_path,
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.ca) if mtls else "",
    )


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> None:
        async with AsyncClient(sidecar.address, root_certificates=certs.read("ca")) as secure:
            await secure.set_budget("cus_a", 100)
        async with AsyncClient(sidecar.address, retry=_NO_RETRY) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.balance("cus_a")

    run(tls_settings(tmp_path, certs), body)


def test_mtls_needs_a_client_certificate_signed_by_the_client_ca(tmp_path: Path, certs: Certs) -> None:
    async def body(sidecar: Sidecar) -> None:
        signed = tls_credentials(certs.read("ca"), certs.read("client_key"), certs.read("client_cert"))
        async with AsyncClient(sidecar.address, credentials=signed) as client:
            await client.set_budget("cus_a", 100)
        stranger = tls_credentials(certs.read("ca"), certs.read("stranger_key"), certs.read("stranger_cert"))
        for credentials in (tls_credentials(certs.read("ca")), stranger):
            async with AsyncClient(sidecar.address, credentials=credentials, retry=_NO_RETRY) as refused:
                with pytest.raises(Unavailable):
                    await refused.balance("cus_a")

    run(tls_settings(tmp_path, certs, mtls=True), body)


def test_a_missing_or_non_pem_certificate_file_is_refused_before_the_data_dir_is_opened(
    tmp_path: Path, certs: Certs
) -> None:
    for cert in (tmp_path / "absent.pem", certs.server_key.with_suffix(".csr")):
        settings = dataclasses.replace(tls_settings(tmp_path, certs), tls_cert_file=str(cert))
        with pytest.raises(ConfigError, match="tls_cert_file"):
            run(settings, _never)
    assert not (tmp_path / "data").exists()


def test_tls_needs_both_the_certificate_and_its_key() -> None:
    with pytest.raises(ConfigError, match="set tls_key_file too"):
        Settings(tls_cert_file="/etc/cert.pem")
    with pytest.raises(ConfigError, match="mTLS needs the server's own certificate"):
        Settings(tls_client_ca_file="/etc/ca.pem")


# -- safe by default ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "sidecar.example:50051"])
def test_a_non_loopback_address_without_tls_and_client_auth_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_exposure(Settings(listen=listen), Tokens())
    message = str(caught.value)
    assert "TLS" in message and "client authentication" in message and "--allow-insecure-non-loopback" in message
    tokens = Tokens(admin=(ADMIN_TOKEN.encode(),))
    with pytest.raises(ConfigError, match="has no TLS"):  # tokens alone would cross the network in plaintext
        check_exposure(Settings(listen=listen), tokens)


def test_non_loopback_is_allowed_with_tls_and_tokens_or_mtls_or_the_insecure_flag() -> None:
    tls = {"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem"}
    check_exposure(Settings(listen="0.0.0.0:1", **tls), Tokens(app=(APP_TOKEN.encode(),)))
    check_exposure(Settings(listen="0.0.0.0:1", tls_client_ca_file="/ca.pem", **tls), Tokens())
    check_exposure(Settings(listen="0.0.0.0:1", allow_insecure_non_loopback=True), Tokens())
    for loopback in ("127.0.0.1:1", "127.8.9.10:1", "[::1]:1", "localhost:1"):
        check_exposure(Settings(listen=loopback), Tokens())


def test_the_http_port_follows_the_same_rule(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, http_listen="0.0.0.0:0")
    with pytest.raises(ConfigError, match="setting 'http_listen': 0.0.0.0:0 is not a loopback address"):
        run(settings, _never)
    assert not (tmp_path / "data").exists()  # refused before anything was opened or bound
    check_exposure(Settings(http_listen="9100"), Tokens())  # a bare port binds 127.0.0.1


async def _never(_: Sidecar) -> None:
    raise AssertionError("the sidecar should not have started")


def test_the_cli_talks_tls_and_mtls_with_its_flags(tmp_path: Path, certs: Certs) -> None:
    from ..test_cli import spendgate_cli

    async def body(sidecar: Sidecar) -> list[tuple[int, str]]:
        target = ["--target", sidecar.address, "--tls-root-cert", str(certs.ca)]
        client = ["--tls-client-cert", str(certs.client_cert), "--tls-client-key", str(certs.client_key)]
        runs = [
            ["budget", "set", "cus_a", "--limit", "9", *target, *client],  # mTLS: the signed client
            ["budget", "show", "cus_a", *target],  # no client certificate: the handshake fails
            ["budget", "show", "cus_a", *target, "--tls-client-cert", str(certs.client_cert)],
        ]
        results = [await asyncio.to_thread(spendgate_cli, *args) for args in runs]
        return [(r.returncode, r.stdout + r.stderr) for r in results]

    (ok, shown), (refused, why), (half, usage) = run(tls_settings(tmp_path, certs, mtls=True), body)
    assert ok == 0 and "created budget cus_a" in shown
    assert refused == 1 and "UNAVAILABLE" in why
    assert half == 1 and "needs both --tls-client-cert and --tls-client-key" in usage


def test_serve_on_a_non_loopback_address_exits_2_before_opening_anything(tmp_path: Path) -> None:
    from ..test_cli import spendgate_cli

    refused = spendgate_cli("serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "data"))
    assert refused.returncode == 2
    assert "0.0.0.0:0 is not a loopback address" in refused.stderr and "--allow-insecure-non-loopback" in refused.stderr
    assert not (tmp_path / "data").exists()
