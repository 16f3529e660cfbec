"""Test helpers that users of spendgate can import too."""

from typing import Any

from spendgate.testing.sidecar import Sidecar, SidecarError

__all__ = ["FakeStripe", "Sidecar", "SidecarError"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m spendgate.testing.fake_stripe` does not find its own module already
    # imported by this package (runpy warns about that).
    if name == "FakeStripe":
        from spendgate.testing.fake_stripe import FakeStripe

        return FakeStripe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
