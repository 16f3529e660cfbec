"""Regenerate the committed gRPC code in python/spendgate/v1/ from proto/spendgate/v1/*.proto.

    python -m spendgate.v1.regenerate              # rewrite the committed files in place
    python -m spendgate.v1.regenerate --out DIR    # write DIR/spendgate/v1/*_pb2*.py* instead (used by the drift test)

Needs grpcio-tools. The output records the grpcio-tools and protobuf versions that made it, so regenerate with the
versions the project pins, or the drift test will (rightly) report a difference.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path
from typing import Final

# python/spendgate/v1/regenerate.py -> the repository root is three folders up from this file's folder.
REPO_ROOT: Final[Path] = Path(__file__).resolve().parents[3]
PROTO_ROOT: Final[Path] = REPO_ROOT / "proto"
PYTHON_ROOT: Final[Path] = REPO_ROOT / "python"
# The package path shared by proto/ and python/, so that imports read `from spendgate.v1 import spendgate_pb2`.
PACKAGE_PATH: Final[str] = "spendgate/v1"

COMMAND: Final[str] = "python -m spendgate.v1.regenerate"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto of the package, relative to proto_root, sorted so that the output does not depend on the disk."""
    files = sorted(p.relative_to(proto_root) for p in (proto_root / PACKAGE_PATH).glob("*.proto"))
    assert files, f"no .proto files under {proto_root / PACKAGE_PATH}"
    return files


def generated_names(proto_root: Path = PROTO_ROOT) -> list[str]:
    """The file names protoc writes into <out>/spendgate/v1/ for the package's .proto files."""
    names: list[str] = []
    for proto in proto_files(proto_root):
        stem = proto.stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def regenerate(out_root: Path = PYTHON_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc; returns the paths it wrote. Raises RuntimeError naming the command when protoc fails."""
    # Imported here: grpc_tools is a development dependency, not needed to run the sidecar.
    from grpc_tools import protoc

    # grpc_tools ships the well-known types (google/protobuf/*.proto); include them so that the contract may import
    # them.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        # Absolute paths inside the first -I root: protoc names them relative to it (spendgate/v1/...).
        *(str(proto_root / p) for p in proto_files(proto_root)),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args[1:])}")
    written = [out_root / PACKAGE_PATH / name for name in generated_names(proto_root)]
    for path in written:
        assert path.is_file(), f"protoc did not write {path}"
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PYTHON_ROOT,
        metavar="DIR",
        help=f"root to write <DIR>/{PACKAGE_PATH}/ under (default: {PYTHON_ROOT}, the committed code)",
    )
    parser.add_argument(
        "--proto-root", type=Path, default=PROTO_ROOT, metavar="DIR", help=f"the -I root (default: {PROTO_ROOT})"
    )
    args = parser.parse_args(argv)
    for path in regenerate(args.out, args.proto_root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
