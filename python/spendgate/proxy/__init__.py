"""The OpenAI- and Anthropic-compatible HTTP proxy: point an SDK's base URL at the sidecar, and every call is
reserved before and committed exactly after, through the same BudgetService as the gRPC Reserve.

- server.py: the routes, who pays, forwarding and streaming, the commit or release after the call
- estimate.py: a call's worst case in tokens from its body (input bytes, context window, output bounds)
- wire.py: the providers' error shapes, server-sent events, where each API puts its usage
- keys.py: per-customer virtual keys (`spendgate key create CUSTOMER`), stored hashed in the data dir
"""

from spendgate.proxy.keys import KeyStore, KeyStoreError
from spendgate.proxy.server import Proxy, ProxySettings

__all__ = ["KeyStore", "KeyStoreError", "Proxy", "ProxySettings"]
