"""Mutual TLS for the local stack's Dask cluster (issue #25): a private CA and a certificate and key
for each role (scheduler, worker, client), the scheduler's and workers' command-line flags, and the
Dask settings a client process needs.

Without it anyone who reaches tcp://127.0.0.1:8786 can run code in the workers, which hold keys.
With it the scheduler and workers listen on tls:// only and distributed requires a certificate from
our CA on every connection, both ways (its ``Security`` sets ``verify_mode = CERT_REQUIRED`` on
listeners and connectors alike). Distributed does not check host names (``check_hostname = False``:
it expects a cluster's own CA), so the SubjectAltName entries are for other TLS tools, not for it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed import Security

from store.private_files import write_private

ROLES = ("scheduler", "worker", "client")
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# 825 days: the longest that browsers and macOS accept for a leaf; also used for the CA, which
# signs only at creation (its key is not kept) and so need not outlive its leaves.
VALID_DAYS = 825
# Certificates closer than this to expiring are replaced at the next start rather than left to
# expire under a running stack.
RENEW_BEFORE = datetime.timedelta(days=30)
# Tolerates a clock that is a little behind the one that made the certificates.
BACKDATE = datetime.timedelta(minutes=5)

# What each role's certificate may be used for. Scheduler and workers both listen and connect (the
# scheduler connects to workers, workers to each other and to the scheduler); a client only connects.
_USAGES = {
    "scheduler": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "worker": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
}


class DaskTLSError(ValueError):
    """A certificate folder or file that cannot be trusted (a link, another owner, open to others)."""


@dataclass(frozen=True)
class DaskCertificates:
    """The files of one certificate set: the CA's certificate (no key) and a certificate and private
    key per role. Every certificate is signed by that CA; any of them is accepted by the others, so
    the split per role limits what each process holds, not what it may do."""

    ca_file: Path
    scheduler_cert: Path
    scheduler_key: Path
    worker_cert: Path
    worker_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> DaskCertificates:
        """The file names ``make_certificates`` uses in ``folder`` (whether or not they exist)."""
        return cls(ca_file=folder / "ca.pem",
                   **{f"{role}_{kind}": folder / f"{role}-{kind}.pem" for role in ROLES for kind in ("cert", "key")})

    def files(self) -> list[Path]:
        return [self.ca_file] + [path for role in ROLES for path in self.pair(role)]

    def pair(self, role: str) -> tuple[Path, Path]:
        """``role``'s certificate and private key."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return getattr(self, f"{role}_cert"), getattr(self, f"{role}_key")

    def scheduler_arguments(self) -> list[str]:
        """Flags for ``python -m distributed.cli.dask_scheduler``: listen on tls:// with the
        scheduler's certificate, and accept only peers with a certificate from our CA."""
        return self._arguments("scheduler")

    def worker_arguments(self) -> list[str]:
        """Flags for ``python -m distributed.cli.dask_worker`` (the worker and its nanny): the same,
        with the worker's certificate, which it also shows when it connects to the scheduler."""
        return self._arguments("worker")

    def _arguments(self, role: str) -> list[str]:
        cert, key = self.pair(role)
        # --protocol tls spelled out: distributed would pick tls anyway once a TLS flag is given, but
        # only as a side effect of require_encryption, which a DASK_ setting in the environment may turn off.
        return ["--protocol", "tls", "--tls-ca-file", str(self.ca_file), "--tls-cert", str(cert), "--tls-key", str(key)]

    def client_environment(self) -> dict[str, str]:
        """Dask settings, as environment variables, with which ``distributed.Client("tls://...")``
        (and so prefect-dask's ``DaskTaskRunner(address=...)``) in another process connects with the
        client certificate and refuses unencrypted connections. Give them only to processes that
        connect to this cluster: one that starts its own (``LocalCluster``) would need TLS too."""
        return {
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(self.ca_file),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(self.client_cert),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(self.client_key),
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        }

    def security(self, role: str = "client") -> Security:
        """A ``distributed.Security`` for ``role`` in this process (e.g. ``Client(address,
        security=certificates.security())``), with only that role's certificate and key."""
        cert, key = self.pair(role)
        return Security(require_encryption=True, tls_ca_file=str(self.ca_file),
                        **{f"tls_{role}_cert": str(cert), f"tls_{role}_key": str(key)})


def make_certificates(folder: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> DaskCertificates:
    """The certificate set in ``folder`` (made 0700 if missing): the existing one when every file is
    there, signed by its CA, matched by its key, names ``hosts`` and is not near expiry; otherwise a
    new CA and new certificates and keys for every role, replacing all files (each 0600, written
    atomically). Raises ``DaskTLSError`` for a folder or file that is a link, is another user's, or
    is open to group or others: its key may have been read, so we stop rather than reuse or hide it.
    """
    folder = Path(folder)
    hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
    _private_folder(folder)
    certificates = DaskCertificates.in_folder(folder)
    present = [path for path in certificates.files() if os.path.lexists(path)]
    for path in present:
        _check_trusted(path, stat.S_ISREG, "file")
    if len(present) == len(certificates.files()) and _usable(certificates, hosts):
        return certificates
    _write_new_set(certificates, hosts)
    return certificates


def _private_folder(folder: Path) -> None:
    if not os.path.lexists(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
    _check_trusted(folder, stat.S_ISDIR, "folder")


def _check_trusted(path: Path, is_kind: Callable[[int], bool], kind: str) -> None:
    """Raise unless ``path`` is a ``kind`` (not a link), ours, and closed to group and others."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not is_kind(info.st_mode):
        problem = "is a symbolic link" if stat.S_ISLNK(info.st_mode) else f"is not a {kind}"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to this user ({os.geteuid()})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}; group and others must have no access"
    else:
        return
    raise DaskTLSError(f"Dask TLS {kind} {path} {problem}; remove it (or its folder) to make new certificates")


def _usable(certificates: DaskCertificates, hosts: tuple[str, ...]) -> bool:
    """Whether every role's certificate is signed by the CA, matches its key, names ``hosts`` and
    is valid for at least RENEW_BEFORE more; a file we cannot parse makes the set unusable."""
    now = datetime.datetime.now(datetime.UTC)
    try:
        authority = x509.load_pem_x509_certificate(certificates.ca_file.read_bytes())
        for role in ROLES:
            cert_path, key_path = certificates.pair(role)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate.verify_directly_issued_by(authority)
            if key.public_key() != certificate.public_key():
                return False
            for cert in (authority, certificate):
                if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc - RENEW_BEFORE:
                    return False
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if not set(_general_names(hosts)) <= set(names):
                return False
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return True


def _write_new_set(certificates: DaskCertificates, hosts: tuple[str, ...]) -> None:
    """A new CA signs one certificate per role. Its private key stays in memory only and is gone
    when this returns: whoever holds it can mint a client certificate the cluster accepts, so a
    later start with a file missing makes a whole new set rather than signing one more."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cxr-screen Dask CA {secrets.token_hex(4)}")])
    authority = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cxr-screen Dask {role}")])
        certificate = (
            _builder(name, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(_USAGES[role]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_general_names(hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = certificates.pair(role)
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    # Written last: a set cut short has a missing or mismatched CA, which _usable rejects.
    write_private(certificates.ca_file, authority.public_bytes(serialization.Encoding.PEM))


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _general_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names

