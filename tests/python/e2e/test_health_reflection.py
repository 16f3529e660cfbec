"""Operability: the standard health service, server reflection, and a clean SIGTERM shutdown."""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ._bursts import HUGE_LIMIT, Burst, check_books_after_restart
from ._support import LONG_TTL_MS, RPC_TIMEOUT_S, Conn, counters, new_customer


def _reflect(conn: Conn, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(conn.channel)
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S))
    assert not reply.HasField("error_response"), reply.error_response
    return reply


def test_health_service_says_serving(sidecar):
    with Conn(sidecar.target) as conn:
        health = health_pb2_grpc.HealthStub(conn.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_budget_and_admin_services(sidecar):
    with Conn(sidecar.target) as conn:
        reply = _reflect(conn, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in reply.list_services_response.service}
        assert {"spendgate.v1.Budget", "spendgate.v1.Admin"} <= names, names


def test_reflection_describes_the_budget_methods(sidecar):
    with Conn(sidecar.target) as conn:
        reply = _reflect(conn, reflection_pb2.ServerReflectionRequest(file_containing_symbol="spendgate.v1.Budget"))
        methods: dict[str, set[str]] = {}
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for service in fd.service:
                methods[f"{fd.package}.{service.name}"] = {m.name for m in service.method}
        budget_methods = {"Reserve", "Commit", "Release", "GetBalance", "Ping"}
        assert methods.get("spendgate.v1.Budget", set()) >= budget_methods, methods
        assert methods.get("spendgate.v1.Admin", set()) >= {"SetBudget", "ListBudgets"}, methods


def test_sigterm_exits_zero_and_keeps_a_commit_acknowledged_just_before(sidecar):
    customer = new_customer("sigterm")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, 1000)
        open_hold = conn.reserve(customer, 300, ttl_ms=LONG_TTL_MS)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        committed = conn.commit(hold.reservation_id, 90)
        assert committed.charged == 90
        before = counters(conn.balance(customer))

    exit_code = sidecar.terminate()
    assert exit_code == 0, f"SIGTERM should exit 0, got {exit_code}; log tail:\n{sidecar.log_tail()}"

    sidecar.restart()
    with Conn(sidecar.target) as conn:
        after = counters(conn.balance(customer))
        assert after == before
        assert (after["spent"], after["reserved"], after["active_holds"]) == (90, 300, 1)
        assert conn.commit(hold.reservation_id, 90).replayed
        assert not conn.commit(open_hold.reservation_id, 300).replayed


def test_sigterm_under_load_exits_zero_and_keeps_every_acknowledged_commit(sidecar):
    customer = new_customer("sigterm-burst")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, HUGE_LIMIT)
        before = counters(conn.balance(customer))

    burst = Burst(sidecar.target, customer, seed=11)
    burst.start()
    burst.wait_for(acked_commits=200)
    exit_code = burst.terminate(sidecar)
    burst.join()
    assert exit_code == 0, f"SIGTERM under load should drain and exit 0, got {exit_code}:\n{sidecar.log_tail()}"

    sidecar.restart()
    with Conn(sidecar.target) as conn:
        check_books_after_restart(before, counters(conn.balance(customer)), burst.books)
