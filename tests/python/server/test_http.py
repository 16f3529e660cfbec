"""spendgate.server.http: the sidecar's HTTP server (webhooks now; metrics next), on the asyncio loop."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from aiohttp import web

from spendgate.server.http import HttpServer, new_http_app, parse_listen


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("8081", ("127.0.0.1", 8081)),
        (":8081", ("127.0.0.1", 8081)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["", "host:", "host:http", "127.0.0.1:70000"])
def test_parse_listen_refuses_nonsense(listen: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT|not in 0..65535"):
        parse_listen(listen)


def test_routes_serve_on_the_bound_port_and_a_taken_port_fails_to_bind() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    async def main() -> None:
        app = new_http_app()
        app.router.add_get("/hello", hello)
        server = HttpServer(app, "127.0.0.1:0", shutdown_grace_s=1)
        await server.start()
        try:
            host, port = parse_listen(server.address)
            assert host == "127.0.0.1" and port > 0
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{server.url}/hello", timeout=10).read())
            assert json.loads(body) == {"hello": "world"}
            second = HttpServer(new_http_app(), server.address, shutdown_grace_s=1)
            with pytest.raises(OSError):
                await second.start()
            await second.stop()
        finally:
            await server.stop()
            await server.stop()  # idempotent

    asyncio.run(main())
