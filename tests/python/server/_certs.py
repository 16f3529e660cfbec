"""Test certificates made with the `openssl` command (Debian's): a CA, a server certificate for 127.0.0.1 and
localhost, two client certificates it signed, and a second CA that signed nothing the server trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SUBJECT_ALT_NAMES = "subjectAltName=IP:127.0.0.1,DNS:localhost"
VALID_DAYS = "2"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path
    second_client_cert: Path  # another client the CA signed (a second identity)
    second_client_key: Path

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        VALID_DAYS,
        "-subj",
        f"/CN={name}",
    )
    return cert, key


def _signed(directory: Path, name: str, ca: tuple[Path, Path], extension: str | None) -> tuple[Path, Path]:
    cert, key, request = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(request),
        "-subj",
        f"/CN={name}",
    )
    extra = []
    if extension:
        ext_file = directory / f"{name}.ext"
        ext_file.write_text(extension + "\n")
        extra = ["-extfile", str(ext_file)]
    _openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        VALID_DAYS,
        *extra,
    )
    return cert, key


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    server = _signed(directory, "server", ca, SUBJECT_ALT_NAMES)
    client = _signed(directory, "client", ca, None)
    stranger = _signed(directory, "stranger", _ca(directory, "other-ca"), None)
    second = _signed(directory, "second-client", ca, None)
    return Certs(ca[0], server[0], server[1], client[0], client[1], stranger[0], stranger[1], second[0], second[1])
