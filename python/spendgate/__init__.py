"""spendgate: a gRPC budget-enforcement sidecar for LLM spend.

Kept light on purpose: importing the package imports nothing heavy (no grpc, no native engine), so that
`spendgate --help` stays fast. Import the submodules you need: spendgate.config, spendgate.server.app, spendgate.v1.
"""
