"""The gRPC transport: grpc.aio servicers that convert a request, call the engine and convert the reply.

status.py maps engine errors to gRPC status codes, durability.py waits for the group-commit writer without blocking the
event loop, app.py composes the engine, the services, health and reflection into one server.
"""
