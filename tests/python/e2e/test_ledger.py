"""The audit trail through real sidecar processes: Admin.ListLedger's pages while commits go on, the settlement state
of each entry against the fake Stripe, `spendgate ledger export` equal to GetUsage (CSV and JSON lines), archived
entries in an export, an org's members, and bad input."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.settle._load import call_until_ok, stubs
from tests.python.settle._sidecar import create_budgets, wait_drained, wait_for_status
from tests.python.settle._support import no_stripe_env, sidecar_env, spendgate_cli

HANG_GUARD_S = 60.0  # not a timing assertion: a bug fails the test instead of hanging it
TOKEN_MODEL = "gpt-6-sol"  # in the bundled price table


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=["cus_acme", "cus_org"], same_host=True) as fake:
        yield fake


def commit(budget: object, customer: str, amount: int, dimensions: dict[str, str] | None = None) -> str:
    reply = call_until_ok(budget.Reserve, pb.ReserveRequest(customer_id=customer, amount=amount))  # type: ignore[attr-defined]
    assert reply.granted, reply
    call_until_ok(
        budget.Commit,
        pb.CommitRequest(
            reservation_id=reply.reservation_id,
            amount=amount,  # type: ignore[attr-defined]
            dimensions=dimensions or {},
        ),
    )
    return str(reply.reservation_id)


def commit_tokens(budget: object, customer: str) -> str:
    estimate = pb.TokenEstimate(model=TOKEN_MODEL, input_tokens=1_000, max_output_tokens=200)
    reply = call_until_ok(budget.Reserve, pb.ReserveRequest(customer_id=customer, estimate=estimate))  # type: ignore[attr-defined]
    assert reply.granted, reply
    usage = pb.TokenUsage(input_tokens=800, cached_input_tokens=100, output_tokens=150, reasoning_tokens=20)
    call_until_ok(
        budget.Commit,
        pb.CommitRequest(
            reservation_id=reply.reservation_id,
            usage=usage,  # type: ignore[attr-defined]
            dimensions={"feature": "chat"},
        ),
    )
    return str(reply.reservation_id)


def list_all(
    admin: object, customer: str, period: str = "", limit: int = 0, after: int = 0
) -> tuple[list[pb.LedgerEntry], int]:
    """Every page from `after`; the entries and the last cursor."""
    entries: list[pb.LedgerEntry] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        page = admin.ListLedger(
            pb.ListLedgerRequest(
                customer_id=customer,
                period=period,
                after=after,  # type: ignore[attr-defined]
                limit=limit,
            ),
            timeout=10,
        )
        assert all(after < e.seq <= page.next_after for e in page.entries)
        entries += page.entries
        if not page.more:
            return entries, page.next_after
        assert page.next_after > after and time.monotonic() < deadline
        after = page.next_after


def usage(budget: object, customer: str, period: str = "") -> pb.Usage:
    return call_until_ok(budget.GetUsage, pb.GetUsageRequest(customer_id=customer, period=period))  # type: ignore[attr-defined]


def test_pages_neither_skip_nor_repeat_an_entry_while_commits_go_on(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("paging", env=no_stripe_env())
    create_budgets(sidecar.target, {"acme": "cus_acme", "globex": "cus_globex"})
    channel, budget, admin = stubs(sidecar.target)
    committed: list[str] = []
    with channel:
        for n in range(120):
            committed.append(commit(budget, "acme", 1 + n % 5))
            if n % 2:
                commit(budget, "globex", 3)
        stop = threading.Event()

        def more_commits() -> None:
            own, b, _ = stubs(sidecar.target)
            with own:
                while not stop.is_set():
                    committed.append(commit(b, "acme", 2))
                    commit(b, "globex", 1)

        writer = threading.Thread(target=more_commits)
        writer.start()
        paged: list[pb.LedgerEntry] = []
        cursor, more = 0, True
        try:
            while more:  # pages of 7, each after at least one more commit, until the pages catch up
                seen = len(committed)
                deadline = time.monotonic() + HANG_GUARD_S
                while len(committed) == seen:
                    assert time.monotonic() < deadline and writer.is_alive(), "the writer stopped committing"
                    time.sleep(0.001)
                page = admin.ListLedger(pb.ListLedgerRequest(customer_id="acme", after=cursor, limit=7), timeout=10)
                paged += page.entries
                more, cursor = page.more, page.next_after
        finally:
            stop.set()
            writer.join(HANG_GUARD_S)
        assert len(paged) > 120, "the pages did not reach the commits made while they ran"
        rest, _ = list_all(admin, "acme", limit=7, after=cursor)  # what came after the last page
        entries = paged + rest
        seqs = [e.seq for e in entries]
        assert seqs == sorted(set(seqs)), "a seq repeated or came out of order"
        assert [e.reservation_id for e in entries] == committed, "an entry was skipped, repeated or misordered"
        assert all(e.customer_id == "acme" for e in entries)
        assert all(e.state == pb.SETTLEMENT_STATE_PENDING and not e.meter_event_identifiers for e in entries)
        assert all(e.identifier == f"sg-{e.reservation_id}" and e.stripe_customer_id == "cus_acme" for e in entries)
        shown = usage(budget, "acme")
        assert (len(entries), sum(e.amount for e in entries)) == (shown.commits, shown.total)


def test_each_entry_shows_its_settlement_state_and_the_meter_events_that_carry_it(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("states", env=sidecar_env(fake))
    create_budgets(sidecar.target, {"acme": "cus_acme", "initech": "cus_initech"})  # Stripe lacks cus_initech
    channel, budget, admin = stubs(sidecar.target)
    with channel:
        plain = commit(budget, "acme", 5, {"action": "summarize"})
        tokens = commit_tokens(budget, "acme")
        commit(budget, "initech", 40)
        wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0 and s.dead_letters == 1, "settling")
        fake.start_outage()
        try:
            waiting = commit(budget, "acme", 7)
            entries, _ = list_all(admin, "acme")
            dead, _ = list_all(admin, "initech")
        finally:
            fake.end_outage()
        by_rsv = {e.reservation_id: e for e in entries}
        assert list(by_rsv) == [plain, tokens, waiting]
        at_stripe = {ev["identifier"]: ev for ev in fake.events(status="accepted")}

        sent = by_rsv[plain]
        assert sent.state == pb.SETTLEMENT_STATE_SENT and sent.settled_ms >= sent.ts_ms > 0
        assert list(sent.meter_event_identifiers) == [sent.identifier] == [f"sg-{plain}"]
        assert at_stripe[sent.identifier]["value"] == 5 and dict(sent.dimensions) == {"action": "summarize"}

        token = by_rsv[tokens]
        assert token.state == pb.SETTLEMENT_STATE_SENT and token.model == TOKEN_MODEL
        assert {p.token_type: p.tokens for p in token.parts} == {
            "input": 800,
            "cached_input": 100,
            "output": 150,
            "reasoning": 20,
        }
        assert sum(p.units for p in token.parts) == token.amount
        # One event per wire token type (reasoning goes out as output), each at Stripe with its tokens.
        expected = {f"sg-{tokens}-input": 800, f"sg-{tokens}-output": 170, f"sg-{tokens}-cached_input": 100}
        assert sorted(token.meter_event_identifiers) == sorted(expected)
        assert {i: at_stripe[i]["value"] for i in token.meter_event_identifiers} == expected

        pending = by_rsv[waiting]
        assert pending.state == pb.SETTLEMENT_STATE_PENDING and pending.settled_ms == 0
        assert [e.state for e in dead] == [pb.SETTLEMENT_STATE_DEAD_LETTER]
        assert "cus_initech" in dead[0].dead_letter_reason and dead[0].stripe_customer_id == "cus_initech"

        wait_drained(sidecar.target)  # the outage is over: the pending one goes out
        after, _ = list_all(admin, "acme")
        assert [e.state for e in after] == [pb.SETTLEMENT_STATE_SENT] * 3
        assert after[2].meter_event_identifiers[0] in {ev["identifier"] for ev in fake.events(status="accepted")}


def export(target: str, customer: str, fmt: str, *extra: str) -> tuple[str, str]:
    done = spendgate_cli("ledger", "export", customer, "--format", fmt, "--target", target, *extra, env=no_stripe_env())
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_an_export_adds_up_to_get_usage_in_csv_and_json_lines_and_an_org_lists_its_members(
    sidecar_factory: SidecarFactory, fake: FakeStripe, tmp_path: Path
) -> None:
    sidecar = sidecar_factory("export", env=sidecar_env(fake))
    channel, budget, admin = stubs(sidecar.target)
    with channel:
        call_until_ok(
            admin.SetBudget, pb.SetBudgetRequest(customer_id="org", limit=10**9, stripe_customer_id="cus_org")
        )
        call_until_ok(admin.SetBudget, pb.SetBudgetRequest(customer_id="team", limit=10**9, parent_id="org"))
        create_budgets(sidecar.target, {"acme": "cus_acme"})
        for n in range(30):
            commit(budget, "acme", 1 + n, {"action": f"a{n % 3}"})
            commit(budget, "team", 2)
        commit_tokens(budget, "acme")
        commit(budget, "org", 11)  # the org's own
        wait_drained(sidecar.target)
        acme = usage(budget, "acme")

        out, err = export(sidecar.target, "acme", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert (len(rows), sum(int(r["amount"]) for r in rows)) == (acme.commits, acme.total) == (31, acme.total)
        assert f"exported 31 entries, total {acme.total} units" in err and f"total {acme.total} units" in err
        assert all(r["state"] == "sent" and r["stripe_customer_id"] == "cus_acme" for r in rows)
        assert json.loads(rows[0]["dimensions"]) == {"action": "a0"} and rows[0]["meter_event_identifiers"]
        assert rows[-1]["model"] == TOKEN_MODEL and rows[-1]["tokens_input"] == "800"
        assert rows[-1]["tokens_reasoning"] == "20" and len(rows[-1]["meter_event_identifiers"].split()) == 3

        target_file = tmp_path / "acme.jsonl"
        _, err = export(sidecar.target, "acme", "jsonl", "--output", str(target_file), "--period", "current")
        records = [json.loads(line) for line in target_file.read_text().splitlines()]
        assert [r["seq"] for r in records] == [int(r["seq"]) for r in rows]
        assert sum(r["amount"] for r in records) == acme.total and "exported 31 entries" in err
        assert records[-1]["tokens"] == {"input": 800, "cached_input": 100, "output": 150, "reasoning": 20}

        # The org's period holds its own entry and its member's (its usage counts both); the member's only its own.
        org = usage(budget, "org")
        out, err = export(sidecar.target, "org", "jsonl")
        org_records = [json.loads(line) for line in out.splitlines()]
        assert (len(org_records), sum(r["amount"] for r in org_records)) == (org.commits, org.total) == (31, 71)
        assert {r["customer_id"] for r in org_records} == {"org", "team"}
        assert all(r["parent"] == "org" for r in org_records if r["customer_id"] == "team")
        team = usage(budget, "team")
        team_entries, _ = list_all(admin, "team")
        assert (len(team_entries), sum(e.amount for e in team_entries)) == (team.commits, team.total) == (30, 60)


def test_an_export_of_a_closed_period_includes_the_archived_entries(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    env = sidecar_env(fake, ledger_retention_days=0, prune_interval_ms=100)
    sidecar = sidecar_factory("archive", env=env)
    now_ms = time.time_ns() // 1_000_000
    start_ms, end_ms = now_ms - 1_000, now_ms + 3_000
    channel, budget, admin = stubs(sidecar.target)
    with channel:
        period = pb.Period(kind=pb.PERIOD_KIND_FIXED, start_ms=start_ms, end_ms=end_ms)
        call_until_ok(
            admin.SetBudget,
            pb.SetBudgetRequest(customer_id="acme", limit=10**9, stripe_customer_id="cus_acme", period=period),
        )
        create_budgets(sidecar.target, {"initech": "cus_initech"})  # another customer's entries stay out
        amounts = [3, 1, 4, 1, 5, 9, 2, 6]
        for amount in amounts:
            commit(budget, "acme", amount)
            commit(budget, "initech", 100)
        wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0, "settling")
        archive_dir = Path(sidecar.data_dir) / "archive"
        deadline = time.monotonic() + HANG_GUARD_S
        while True:  # the period ends, rolls, and the next prune moves its settled entries to the archive
            try:
                entries, _ = list_all(admin, "acme", period="previous")
            except grpc.RpcError as error:  # no previous period until the roll
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                entries = []
            if entries and all(e.archived for e in entries):
                break
            assert time.monotonic() < deadline, "the period's entries were not archived"
            time.sleep(0.1)
        assert list(archive_dir.glob("ledger-*.jsonl.gz")), "no archive file"
        closed = usage(budget, "acme", "previous")
        assert not closed.current and closed.period_start_ms == start_ms and closed.total == sum(amounts)

        out, err = export(sidecar.target, "acme", "csv", "--period", "previous")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [int(r["amount"]) for r in rows] == amounts
        assert all(r["archived"] == "True" and r["state"] == "sent" and r["meter_event_identifiers"] for r in rows)
        assert f"exported {len(amounts)} entries, total {sum(amounts)} units" in err
        assert f"{closed.commits} commits, total {closed.total} units" in err
        # The current period has nothing yet, and the archived entries are not in it.
        out, _ = export(sidecar.target, "acme", "jsonl")
        assert out == ""


def test_bad_input_is_a_clear_error(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("bad-input", env=no_stripe_env())
    create_budgets(sidecar.target, {"acme": "cus_acme"})
    channel, budget, admin = stubs(sidecar.target)
    with channel:
        commit(budget, "acme", 4)

        def refused(**fields: object) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                admin.ListLedger(pb.ListLedgerRequest(**fields), timeout=10)  # type: ignore[arg-type]
            return caught.value

        unknown = refused(customer_id="nobody")
        assert unknown.code() == grpc.StatusCode.NOT_FOUND and "spendgate budget set" in unknown.details()
        too_many = refused(customer_id="acme", limit=1_001)
        assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..=1000" in too_many.details()
        cursor = refused(customer_id="acme", after=99)
        assert cursor.code() == grpc.StatusCode.INVALID_ARGUMENT and "last seq is 1" in cursor.details()
        period = refused(customer_id="acme", period="last tuesday")
        assert period.code() == grpc.StatusCode.INVALID_ARGUMENT and "ISO date" in period.details()
        assert refused(customer_id="").code() == grpc.StatusCode.INVALID_ARGUMENT
        previous = refused(customer_id="acme", period="previous")
        assert previous.code() == grpc.StatusCode.INVALID_ARGUMENT and "no previous period" in previous.details()
        still, _ = list_all(admin, "acme")
        assert [e.amount for e in still] == [4]  # nothing changed

    done = spendgate_cli(
        "ledger", "export", "nobody", "--format", "csv", "--target", sidecar.target, env=no_stripe_env()
    )
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr and done.stdout == ""
    done = spendgate_cli("ledger", "export", "acme", "--format", "xml", "--target", sidecar.target, env=no_stripe_env())
    assert done.returncode == 2 and "invalid choice: 'xml'" in done.stderr


def test_a_credit_grant_is_listed_as_a_grant_never_billed_and_an_export_still_adds_up_to_get_usage(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("grants", env=sidecar_env(fake))
    channel, budget, admin = stubs(sidecar.target)
    with channel:
        create_budgets(sidecar.target, {"acme": "cus_acme"})
        commit(budget, "acme", 7)
        call_until_ok(
            admin.GrantCredits,
            pb.GrantCreditsRequest(customer_id="acme", amount=500, idempotency_key="g-1", reason="goodwill"),
        )
        commit(budget, "acme", 5)
        wait_drained(sidecar.target)
        entries, _ = list_all(admin, "acme")
        assert [(e.kind or "commit", e.amount) for e in entries] == [("commit", 7), ("grant", 500), ("commit", 5)]
        grant = entries[1]
        assert grant.state == pb.SETTLEMENT_STATE_CREDIT and grant.reason == "goodwill"
        assert not grant.identifier and not grant.meter_event_identifiers, "a grant is never sent to Stripe"
        acme = usage(budget, "acme")
        assert (acme.commits, acme.total) == (2, 12)
        out, err = export(sidecar.target, "acme", "jsonl")
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["kind"] for r in records] == ["commit", "grant", "commit"]
        assert "exported 2 entries, total 12 units (and 1 credit grants, which are not usage)" in err
    assert fake.totals_by_customer() == {"cus_acme": 12}
