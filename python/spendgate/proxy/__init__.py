"""The OpenAI- and Anthropic-compatible HTTP proxy: point an SDK's base URL at the sidecar, and every call is
reserved before and committed exactly after, through the same BudgetService as the gRPC Reserve.

- server.py: the routes, who pays, forwarding and streaming, the commit or release after the call
- estimate.py: a call's worst case in tokens from its body (input bytes, context window, output bounds)
- wire.py: the providers' error shapes, server-sent events, where each API puts its usage
Virtual keys (spendgate.service.virtual_keys) are the sidecar's, shared with the Admin RPCs that manage them.
"""

from spendgate.proxy.server import Proxy, ProxySettings

__all__ = ["Proxy", "ProxySettings"]
