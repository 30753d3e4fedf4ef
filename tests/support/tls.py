"""A certificate authority and server certificates made by the tests themselves (``openssl``).

EC P-256 keys: quick to make, and both Python's ``ssl`` and Kafka's PEM key store read them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path  # the server's certificate, then the CA's (the chain)
    key: Path  # unencrypted PKCS#8
    # Kafka's PEM key store by file location: the encrypted key, then the chain. The key's
    # cipher is one Java 17 reads in PKCS#8 (it has no SecretKeyFactory for PBES2/AES).
    keystore: Path
    key_password: str


def _openssl(*args: str | Path) -> None:
    completed = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))}: {completed.stderr.strip()}")


def require_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")


def make_ca(folder: Path) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    require_openssl()
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "ca.pem", folder / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=smsbridge test CA",
    )  # fmt: skip
    return cert, key


def make_server_certificate(
    folder: Path, ca: tuple[Path, Path], names: str, key_password: str = "keystore-secret"
) -> ServerCertificate:
    """A certificate signed by ``ca`` for ``names`` (a subjectAltName, e.g.
    ``IP:127.0.0.1,DNS:localhost``)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw_key, csr = folder / "server-raw.key", folder / "server.csr"
    key, leaf, extensions = folder / "server.key", folder / "server-leaf.pem", folder / "ext.cnf"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", raw_key, "-out", csr, "-subj", "/CN=smsbridge test broker",
    )  # fmt: skip
    extensions.write_text(f"subjectAltName={names}\n", "utf-8")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", leaf, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", raw_key, "-out", key)
    encrypted = folder / "server-encrypted.key"
    _openssl(
        "pkcs8", "-topk8", "-in", raw_key, "-out", encrypted, "-v1", "PBE-SHA1-3DES",
        "-passout", f"pass:{key_password}",
    )  # fmt: skip
    chain = leaf.read_text("utf-8") + ca[0].read_text("utf-8")
    cert = folder / "server.pem"
    cert.write_text(chain, "utf-8")
    keystore = folder / "keystore.pem"
    keystore.write_text(encrypted.read_text("utf-8") + chain, "utf-8")
    return ServerCertificate(cert=cert, key=key, keystore=keystore, key_password=key_password)
