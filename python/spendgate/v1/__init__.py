"""Generated gRPC code for the spendgate.v1 contract (proto/spendgate/v1/spendgate.proto).

The *_pb2*.py files are generated and committed: never edit them. Regenerate with `python -m spendgate.v1.regenerate`;
tests/python/v1/test_generated_code.py fails when they drift from proto/.
"""
