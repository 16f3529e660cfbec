"""Signed usage-page links: what verifies, what is refused (tampered, expired, another customer's, another key), the
key file, and the stop-at a link allows."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from spendgate import _core
from spendgate.service.usage_links import (
    EXPIRED,
    MAX_LINK_TTL_MS,
    NOT_A_LINK,
    SCOPE_LIMIT,
    SCOPE_VIEW,
    LinkGrant,
    LinkRefused,
    UsageLinkSigner,
    link_target,
    load_or_create_secret,
    new_grant,
    set_stop_at,
)

KEY = b"k" * 32
NOW_S = 1_796_000_000


def grant(**changes: object) -> LinkGrant:
    fields: dict[str, object] = {
        "customer_id": "cus_1",
        "scope": SCOPE_LIMIT,
        "ceiling": 5_000,
        "expires_at_s": NOW_S + 60,
    }
    fields.update(changes)
    return LinkGrant(**fields)  # type: ignore[arg-type]


def params_of(signer: UsageLinkSigner, link: LinkGrant) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(link_target(link, signer)).query))


def test_a_link_verifies_for_its_customer_until_it_expires() -> None:
    signer = UsageLinkSigner(KEY)
    params = params_of(signer, grant())
    assert signer.verify("cus_1", params, now_s=NOW_S) == grant()
    assert signer.verify("cus_1", params, now_s=NOW_S + 59.9) == grant()
    with pytest.raises(LinkRefused) as expired:
        signer.verify("cus_1", params, now_s=NOW_S + 60)
    assert expired.value.public == EXPIRED and expired.value.status == 403


@pytest.mark.parametrize(
    "change",
    [
        {"scope": SCOPE_VIEW},
        {"ceiling": "5001"},
        {"exp": str(NOW_S + 61)},
        {"sig": "A" * 43},
        {"sig": ""},
        {"ceiling": "-1"},
        {"exp": "soon"},
        {"scope": "admin"},
        {"sig": "x" * 100},
    ],
)
def test_any_change_to_a_link_breaks_it(change: dict[str, str]) -> None:
    signer = UsageLinkSigner(KEY)
    params = params_of(signer, grant()) | change
    with pytest.raises(LinkRefused) as refused:
        signer.verify("cus_1", params, now_s=NOW_S)
    assert refused.value.public == NOT_A_LINK


@pytest.mark.parametrize("missing", ["scope", "ceiling", "exp", "sig"])
def test_a_link_missing_a_part_is_refused(missing: str) -> None:
    signer = UsageLinkSigner(KEY)
    params = params_of(signer, grant())
    del params[missing]
    with pytest.raises(LinkRefused, match=repr(missing)):
        signer.verify("cus_1", params, now_s=NOW_S)


def test_another_customers_id_or_another_key_is_refused() -> None:
    signer = UsageLinkSigner(KEY)
    params = params_of(signer, grant())
    for customer in ("cus_2", "cus_1 ", "CUS_1", "", "x" * (_core.MAX_ID_BYTES + 1)):
        with pytest.raises(LinkRefused):
            signer.verify(customer, params, now_s=NOW_S)
    with pytest.raises(LinkRefused):
        UsageLinkSigner(b"j" * 32).verify("cus_1", params, now_s=NOW_S)


def test_ids_that_look_like_the_signed_message_cannot_be_confused() -> None:
    # The message is a JSON list, so no id can shift a field boundary.
    signer = UsageLinkSigner(KEY)
    a = signer.signature(LinkGrant('a","view', SCOPE_VIEW, 0, NOW_S))
    b = signer.signature(LinkGrant("a", SCOPE_VIEW, 0, NOW_S))
    assert a != b


def test_new_grants_check_the_ttl_and_the_ceiling() -> None:
    made = new_grant("cus_1", ttl_ms=0, allow_limit=False, ceiling=0, now_ms=NOW_S * 1000 + 1)
    assert (made.scope, made.ceiling, made.expires_at_s) == (SCOPE_VIEW, 0, NOW_S + 3601)  # rounded up, never shorter
    assert new_grant("c", ttl_ms=60_000, allow_limit=True, ceiling=7, now_ms=0).ceiling == 7
    for kwargs in (
        {"ttl_ms": 59_999},
        {"ttl_ms": MAX_LINK_TTL_MS + 1},
        {"allow_limit": True},
        {"ceiling": 5},
        {"allow_limit": True, "ceiling": _core.MAX_AMOUNT_UNITS + 1},
    ):
        arguments: dict[str, object] = {"ttl_ms": 60_000, "allow_limit": False, "ceiling": 0} | kwargs
        with pytest.raises(_core.EngineError) as refused:
            new_grant("cus_1", now_ms=0, **arguments)  # type: ignore[arg-type]
        assert refused.value.kind == "invalid_argument"


def test_the_key_file_is_made_once_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "usage-link.key"
    first = load_or_create_secret(path, create=True)
    assert len(first) == 64 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path, create=True) == first
    path.write_text("short\n")
    with pytest.raises(ValueError, match="at least 32"):
        load_or_create_secret(path, create=True)
    with pytest.raises(ValueError, match="cannot read"):
        load_or_create_secret(tmp_path / "missing", create=False)


def test_the_stop_at_a_link_allows(tmp_path: Path) -> None:
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    try:
        engine.wait_durable(engine.update_budget("cus_1", limit=10_000).ticket)

        async def wait(ticket: int) -> None:
            engine.wait_durable(ticket)

        async def run(link: LinkGrant, amount: int | None) -> int:
            return (await set_stop_at(engine, wait, link, amount)).stop_at

        assert asyncio.run(run(grant(), 5_000)) == 5_000
        assert not engine.reserve("cus_1", 5_001).granted and engine.balance("cus_1").limit == 10_000
        for link, amount in ((grant(), 5_001), (grant(), 0), (grant(scope=SCOPE_VIEW, ceiling=0), 10)):
            with pytest.raises(LinkRefused):
                asyncio.run(run(link, amount))
        assert engine.balance("cus_1").stop_at == 5_000
        assert asyncio.run(run(grant(), None)) == 0
        assert engine.reserve("cus_1", 10_000).granted
    finally:
        engine.close()
