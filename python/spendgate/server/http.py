"""The sidecar's HTTP side: one aiohttp server on the same asyncio loop as grpc.aio, on its own port.

    app = new_http_app()                       # routes are added by each feature: webhooks today, /metrics next
    add_webhook_routes(app, receiver)
    http = HttpServer(app, "127.0.0.1:8081", shutdown_grace_s=5)
    await http.start()                         # binds (raises OSError if it cannot); http.address is where
    ...
    await http.stop()                          # stops accepting, lets in-flight requests finish within the grace

Binds 127.0.0.1 unless told otherwise: a bare "PORT" (or ":PORT") means 127.0.0.1:PORT.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

from aiohttp import web

log = logging.getLogger("spendgate.http")

DEFAULT_HOST: Final[str] = "127.0.0.1"
# Largest request body accepted. Stripe's event payloads are well under this; a bigger body is refused with 413.
MAX_REQUEST_BYTES: Final[int] = 2 * 1024 * 1024


def new_http_app() -> web.Application:
    """An empty application with the sidecar's limits; features add their routes to it."""
    return web.Application(client_max_size=MAX_REQUEST_BYTES)


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a listen setting: HOST:PORT, [IPv6]:PORT, :PORT or PORT (the last two on 127.0.0.1).
    Raises ValueError naming what is wrong."""
    text = listen.strip()
    host, separator, port_text = text.rpartition(":")
    if not separator:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or PORT, got {listen!r}") from None
    if not 0 <= port <= 65_535:
        raise ValueError(f"port {port} of {listen!r} is not in 0..65535")
    return host, port


class HttpServer:
    """One listening HTTP server. start() and stop() once each; `address` is HOST:PORT as bound."""

    def __init__(
        self,
        app: web.Application,
        listen: str,
        *,
        shutdown_grace_s: float,
        name: str = "http",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = parse_listen(listen)
        self.name = name
        self._ssl_context = ssl_context  # HTTPS when set
        self.address = ""
        # No access log: a request line per webhook would drown the sidecar's own log. Handlers log what matters.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_grace_s)
        self._started = False

    async def start(self) -> None:
        await self._runner.setup()
        self._started = True
        # reuse_port off, as for gRPC: a second sidecar on the same port must fail to bind, not share the traffic.
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False, ssl_context=self._ssl_context)
        await site.start()
        port = self._runner.addresses[0][1] if self._runner.addresses else self.port  # port 0: the one bound
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.address}"

    async def stop(self) -> None:
        """Stop listening and wait (up to the grace) for in-flight requests. Idempotent."""
        if self._started:
            self._started = False
            await self._runner.cleanup()
