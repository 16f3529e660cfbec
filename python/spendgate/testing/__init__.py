"""Test helpers that users of spendgate can import too."""

from spendgate.testing.sidecar import Sidecar, SidecarError

__all__ = ["Sidecar", "SidecarError"]
