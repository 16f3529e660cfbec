"""Limits against abuse, each shown holding through a real server on loopback. (max_message_bytes: test_app.py.)

Long-lived calls are health Watch streams: each stays in flight, and on its connection, until cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spendgate.server.app import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

from .test_app import settings_for
from .test_security import run

# Channels in one process share connections unless told otherwise: this gives a channel a connection of its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# A call that cannot be served while a limit holds is given this long before its deadline says so: long enough that
# a call which could be served always would be, however loaded the machine. It never measures how fast anything is.
BLOCKED_DEADLINE_S = 2.0


@asynccontextmanager
async def watching(channel: grpc.aio.Channel, count: int) -> AsyncIterator[list[Any]]:
    """`count` health Watch streams on `channel`, each past its first reply (so in flight on the server)."""
    health = health_pb2_grpc.HealthStub(channel)
    streams = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(count)]
    try:
        for stream in streams:
            first = await stream.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        yield streams
    finally:
        for stream in streams:
            stream.cancel()


async def ping(channel: grpc.aio.Channel, timeout_s: float | None = None) -> grpc.StatusCode:
    try:
        await pb_grpc.BudgetStub(channel).Ping(pb.PingRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def ping_until_served(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """Ping until it is served: the server learns of cancelled calls a moment after the client cancels them. (The
    test's hang guard bounds the loop.)"""
    while (code := await ping(channel)) is grpc.StatusCode.RESOURCE_EXHAUSTED:
        await asyncio.sleep(0.01)
    return code


def test_rpcs_past_max_concurrent_rpcs_get_resource_exhausted(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> list[grpc.StatusCode]:
        async with (
            grpc.aio.insecure_channel(sidecar.address) as first,
            grpc.aio.insecure_channel(sidecar.address) as second,
        ):
            async with watching(first, 1), watching(second, 1):
                async with grpc.aio.insecure_channel(sidecar.address) as third:
                    refused = await ping(third)
            async with grpc.aio.insecure_channel(sidecar.address) as later:
                return [refused, await ping_until_served(later)]

    assert run(settings_for(tmp_path, max_concurrent_rpcs=2), body) == [
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OK,
    ]


def test_a_connections_streams_past_max_concurrent_streams_wait_while_other_connections_are_served(
    tmp_path: Path,
) -> None:
    async def body(sidecar: Sidecar) -> list[grpc.StatusCode]:
        async with (
            grpc.aio.insecure_channel(sidecar.address) as busy,
            grpc.aio.insecure_channel(sidecar.address, options=OWN_CONNECTION) as other,
        ):
            async with watching(busy, 2) as streams:
                queued = await ping(busy, BLOCKED_DEADLINE_S)  # the client holds it back: no stream is free
                elsewhere = await ping(other)
                streams[0].cancel()
                freed = await ping(busy)
            return [queued, elsewhere, freed]

    assert run(settings_for(tmp_path, max_concurrent_streams=2), body) == [
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OK,
        grpc.StatusCode.OK,
    ]


def test_a_client_that_pings_faster_than_min_ping_interval_ms_is_disconnected(tmp_path: Path) -> None:
    flooding = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_timeout_ms", 60_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]

    async def body(sidecar: Sidecar) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(sidecar.address, options=flooding) as channel:
            async with watching(channel, 1) as (stream,):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stream.read()  # no more replies come: the stream ends only when the server hangs up
        return caught.value.code(), caught.value.details() or ""

    code, details = run(settings_for(tmp_path, min_ping_interval_ms=10_000), body)
    assert code == grpc.StatusCode.UNAVAILABLE and "too many pings" in details.lower()


def test_a_connection_older_than_max_connection_age_ms_is_closed_after_the_grace(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            async with watching(channel, 1) as (stream,):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stream.read()
            return [caught.value.code(), await ping(channel)]  # the client reconnects for the next call

    settings = settings_for(tmp_path, max_connection_age_ms=300, max_connection_age_grace_ms=200)
    assert run(settings, body) == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK]


def test_a_connection_idle_for_max_connection_idle_ms_is_closed_and_the_client_reconnects(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar) -> list[object]:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            first = await ping(channel)
            state = channel.get_state()
            while state is not grpc.ChannelConnectivity.IDLE:  # the server's GOAWAY sends the channel back to idle
                await channel.wait_for_state_change(state)
                state = channel.get_state()
            return [first, state, await ping(channel)]

    settings = settings_for(tmp_path, max_connection_idle_ms=200)
    assert run(settings, body) == [grpc.StatusCode.OK, grpc.ChannelConnectivity.IDLE, grpc.StatusCode.OK]


def test_the_limits_are_server_options_named_by_settings() -> None:
    from spendgate.config import Settings
    from spendgate.server.app import connection_options

    options = dict(connection_options(Settings(max_connection_idle_ms=1, max_connection_age_ms=2)))
    assert options["grpc.max_concurrent_streams"] == 1_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 1 and options["grpc.max_connection_age_ms"] == 2
    assert "grpc.max_connection_idle_ms" not in dict(connection_options(Settings()))  # 0: off
