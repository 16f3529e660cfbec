"""Shared fixtures: real spendgate sidecars in child processes, and clients for them.

- `sidecar_factory(name=None, *, start=True, extra_args=(), env=None, http=False) -> Sidecar`: a Sidecar on
  `tmp_path/<name>` (log in `tmp_path/<name>.log`), started unless start=False, with an HTTP port when http=True.
  Every one is stopped at teardown.
- `sidecar`: one started Sidecar (data dir `tmp_path/sidecar`).
- `client`: a `Client` connected to `sidecar`, closed at teardown.
- `admin(limit=10_000, *, customer_id=None) -> str`: creates a budget through `client` (a fresh customer id unless
  given), asserts it was created with that limit, returns the customer id.
- `unique_customer`: a customer id no other test uses.
A failed test prints the log tails of its sidecars (in "Captured stderr teardown").
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest

# The editable install makes spendgate importable; a bare checkout needs python/ on the path.
if importlib.util.find_spec("spendgate") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from spendgate.client import Client  # noqa: E402
from spendgate.testing import Sidecar  # noqa: E402

_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remember whether setup or the test itself failed, so the fixtures' teardown can show the sidecar logs.
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[_failed_key] = True
    return report


class SidecarFactory(Protocol):
    def __call__(
        self,
        name: str | None = None,
        *,
        start: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        http: bool = False,
    ) -> Sidecar: ...


class CreateBudget(Protocol):
    def __call__(self, limit: int = 10_000, *, customer_id: str | None = None) -> str: ...


def new_customer_id() -> str:
    return f"cus_test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def sidecar_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SidecarFactory]:
    made: list[Sidecar] = []

    def make(
        name: str | None = None,
        *,
        start: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        http: bool = False,
    ) -> Sidecar:
        sidecar = Sidecar(tmp_path / (name or f"sidecar-{len(made)}"), extra_args=extra_args, env=env, http=http)
        made.append(sidecar)
        if start:
            sidecar.start()
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()
    if request.node.stash.get(_failed_key, False):
        for sidecar in made:
            print(f"--- {sidecar!r} log tail:\n{sidecar.log_tail()}", file=sys.stderr)


@pytest.fixture
def sidecar(sidecar_factory: SidecarFactory) -> Sidecar:
    return sidecar_factory("sidecar")


@pytest.fixture
def client(sidecar: Sidecar) -> Iterator[Client]:
    with Client(sidecar.target) as c:
        yield c


@pytest.fixture
def unique_customer() -> str:
    return new_customer_id()


@pytest.fixture
def admin(client: Client) -> CreateBudget:
    def create_budget(limit: int = 10_000, *, customer_id: str | None = None) -> str:
        customer = customer_id or new_customer_id()
        reply = client.set_budget(customer, limit)
        assert reply.created, f"budget {customer} already existed"
        assert reply.balance.limit == limit
        return customer

    return create_budget
