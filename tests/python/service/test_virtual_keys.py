"""spendgate.service.virtual_keys: keys stored hashed in one engine document, usable only once durable."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from spendgate._core import EngineError
from spendgate.service.virtual_keys import DOCUMENT_NAME, KEY_PREFIX, VirtualKeys


class DocumentEngine:
    def __init__(self) -> None:
        self.documents: dict[str, str] = {}
        self.budgets = {"cus_1", "cus_2"}
        self.tickets = 0

    def document(self, name: str) -> str | None:
        return self.documents.get(name)

    def put_document(self, name: str, body: str) -> int:
        self.documents[name] = body
        self.tickets += 1
        return self.tickets

    def balance(self, customer_id: str) -> Any:
        if customer_id not in self.budgets:
            raise EngineError("not_found", f"no budget for {customer_id!r}")
        return object()


class Gate:
    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    async def wait(self, ticket: int) -> None:
        await self.open.wait()


def test_a_key_names_its_customer_and_only_its_hash_is_stored() -> None:
    engine = DocumentEngine()
    keys = VirtualKeys(engine, Gate().wait)
    key, record = asyncio.run(keys.create("cus_1"))
    assert key.startswith(KEY_PREFIX) and keys.customer_of(key) == "cus_1" and keys.customer_of(key + "x") is None
    stored = engine.documents[DOCUMENT_NAME]
    assert key not in stored and record.sha256 in stored and json.loads(stored)["keys"][0]["customer_id"] == "cus_1"
    again = VirtualKeys(engine, Gate().wait)  # a restart reads the durable document
    assert again.customer_of(key) == "cus_1" and again.records() == [record]


def test_revoke_by_id_or_by_customer() -> None:
    keys = VirtualKeys(DocumentEngine(), Gate().wait)
    first, record = asyncio.run(keys.create("cus_1"))
    second, _ = asyncio.run(keys.create("cus_1"))
    third, _ = asyncio.run(keys.create("cus_2"))
    assert [r.key_id for r in asyncio.run(keys.revoke(record.key_id))] == [record.key_id]
    assert keys.customer_of(first) is None and keys.customer_of(second) == "cus_1"
    assert len(asyncio.run(keys.revoke("cus_1"))) == 1 and keys.customer_of(second) is None
    assert keys.customer_of(third) == "cus_2" and asyncio.run(keys.revoke("nothing")) == []


def test_a_key_is_not_usable_before_its_write_is_durable() -> None:
    async def scenario() -> None:
        gate = Gate()
        keys = VirtualKeys(DocumentEngine(), gate.wait)
        gate.open.clear()
        task = asyncio.ensure_future(keys.create("cus_1"))
        await asyncio.sleep(0.01)
        assert not task.done() and keys.records() == []
        gate.open.set()
        key, _ = await task
        assert keys.customer_of(key) == "cus_1"

    asyncio.run(scenario())


def test_a_customer_without_a_budget_gets_no_key() -> None:
    with pytest.raises(EngineError) as raised:
        asyncio.run(VirtualKeys(DocumentEngine(), Gate().wait).create("nobody"))
    assert raised.value.kind == "not_found"
    with pytest.raises(EngineError) as bad:
        asyncio.run(VirtualKeys(DocumentEngine(), Gate().wait).create(""))
    assert bad.value.kind == "invalid_argument"
