"""The committed gRPC code in python/spendgate/v1/ is exactly what proto/ produces."""

from __future__ import annotations

import difflib
from pathlib import Path

from spendgate.v1 import regenerate


def test_committed_generated_code_matches_proto(tmp_path: Path) -> None:
    regenerate.regenerate(out_root=tmp_path)
    committed_dir = regenerate.PYTHON_ROOT / regenerate.PACKAGE_PATH
    for name in regenerate.generated_names():
        fresh = (tmp_path / regenerate.PACKAGE_PATH / name).read_text()
        committed_path = committed_dir / name
        assert committed_path.is_file(), f"{committed_path} is missing: run `{regenerate.COMMAND}`"
        committed = committed_path.read_text()
        if committed != fresh:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        fresh.splitlines(keepends=True),
                        fromfile=f"committed {name}",
                        tofile=f"from proto/ {name}",
                    )
                )[:40]
            )
            raise AssertionError(
                f"{committed_path} differs from what proto/ produces: run `{regenerate.COMMAND}` and commit the result"
                f" (a grpcio-tools version other than the pinned one also shows up here).\n{diff}"
            )


def test_generated_code_imports_as_spendgate_v1() -> None:
    from spendgate.v1 import spendgate_pb2, spendgate_pb2_grpc

    assert spendgate_pb2.DESCRIPTOR.package == "spendgate.v1"
    assert hasattr(spendgate_pb2_grpc, "add_BudgetServicer_to_server")
    assert hasattr(spendgate_pb2_grpc, "add_AdminServicer_to_server")
