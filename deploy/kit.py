"""Operator kit: everything a Flower 1.41 deployment with TLS and SuperNode authentication needs.

Needs only the ``cryptography`` package (installed with flwr)::

    python -m deploy.kit certs --host superlink.example.org --ip 10.0.0.5 --node gpu1 --node gpu2

writes into ``certs/``:

- ``ca.crt``, ``ca.key``: a certificate authority (keep ``ca.key`` offline; ``ca.crt`` goes everywhere)
- ``superlink.crt``, ``superlink.key``: the SuperLink's TLS certificate for the host names and IPs given
- ``nodes/NAME.key``, ``nodes/NAME.pub``: one P-384 key pair per SuperNode; the private key in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``), the
  public key as an ``ecdsa-sha2-nistp384`` SSH line (what ``flwr supernode register`` takes)

It never overwrites a file: when any target exists it stops before writing anything. With ``--node``
alone (no ``--host``/``--ip``) it only adds node key pairs, e.g. for a machine that joins later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Plan:
    """The files one call writes (path -> bytes) and their modes."""

    files: dict[Path, bytes]
    private: set[Path]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """An EC key's usages: digital signatures, plus those named (the others off)."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign"),
        False,
    )
    return x509.KeyUsage(digital_signature=True, encipher_only=False, decipher_only=False, **{**flags, **allowed})


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only."""
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("iet-agc deployment CA"))
        .issuer_name(_name("iet-agc deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], ips: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: every host name and IP address in its SAN."""
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name((hosts or ips)[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            _key_usage(key_agreement=True),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(name: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, ``ecdsa-sha2-nistp384 ... name`` public line) of one SuperNode."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {name}\n".encode()


def plan(out: Path, hosts: list[str], ips: list[str], nodes: list[str], days: int) -> Plan:
    files: dict[Path, bytes] = {}
    private: set[Path] = set()
    if hosts or ips:
        ca_key, ca_cert = make_ca(days)
        sl_key, sl_cert = make_server_cert(ca_key, ca_cert, hosts, ips, days)
        files[out / "ca.crt"] = ca_cert.public_bytes(serialization.Encoding.PEM)
        files[out / "ca.key"] = _pem_key(ca_key)
        files[out / "superlink.crt"] = sl_cert.public_bytes(serialization.Encoding.PEM)
        files[out / "superlink.key"] = _pem_key(sl_key)
        private |= {out / "ca.key", out / "superlink.key"}
    for node in nodes:
        priv, pub = make_node_keys(node)
        files[out / "nodes" / f"{node}.key"] = priv
        files[out / "nodes" / f"{node}.pub"] = pub
        private.add(out / "nodes" / f"{node}.key")
    return Plan(files, private)


def write(p: Plan) -> None:
    """Write every file, or none when any exists already (never overwrites)."""
    existing = sorted(str(f) for f in p.files if f.exists() or f.is_symlink())
    if existing:
        raise FileExistsError("refusing to overwrite existing files: " + ", ".join(existing))
    for path, data in p.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if path in p.private else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # O_EXCL: never clobber, even in a race
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def placement(out: Path, hosts: list[str], ips: list[str], nodes: list[str], port: int) -> str:
    """Where each file goes: which machine, which flag."""
    o = out.resolve()
    addr = f"{(hosts or ips or ['SUPERLINK'])[0]}:{port}"
    rows: list[tuple[str, str]] = []
    if hosts or ips:
        rows += [
            (f"{o}/ca.key", "keep offline (it signs certificates); copy it to no machine"),
            (f"{o}/ca.crt", "every machine: flower-superlink --ssl-ca-certfile, flower-supernode --root-certificates,"),
            ("", "and root-certificates of [superlink.NAME] in the user's $FLWR_HOME/config.toml"),
            (f"{o}/superlink.crt", "SuperLink machine only: flower-superlink --ssl-certfile"),
            (f"{o}/superlink.key", "SuperLink machine only (keep it mode 600): flower-superlink --ssl-keyfile"),
        ]
    for node in nodes:
        rows += [
            (
                f"{o}/nodes/{node}.key",
                f"SuperNode {node}'s machine only (mode 600): flower-supernode --auth-supernode-private-key",
            ),
            (f"{o}/nodes/{node}.pub", f"the user's machine: flwr supernode register {o}/nodes/{node}.pub NAME"),
        ]
    width = max(len(path) for path, _ in rows)
    lines = ["Where each file goes (NAME: the user's SuperLink connection):"]
    lines += [f"  {path:<{width}}  {what}" for path, what in rows]
    if hosts or ips:
        lines.append(
            f"The SuperLink certificate is valid for {', '.join(hosts + ips)}: connect to one of them, e.g. {addr}."
        )
    lines.append("Run flower-superlink with --enable-supernode-auth: only registered node keys are admitted.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m deploy.kit",
        description="Make a CA, a SuperLink TLS certificate and SuperNode key pairs for a Flower deployment.",
    )
    ap.add_argument("out", type=Path, help="folder to write into (made if missing; existing files are never replaced)")
    ap.add_argument("--host", action="append", default=[], help="a DNS name of the SuperLink (repeat for more)")
    ap.add_argument("--ip", action="append", default=[], help="an IP address of the SuperLink (repeat for more)")
    ap.add_argument("--node", action="append", default=[], help="a SuperNode name: one key pair each (repeat)")
    ap.add_argument("--days", type=int, default=825, help="certificate validity in days (default 825)")
    ap.add_argument("--port", type=int, default=8000, help="SuperLink port, for the printed hints (default 8000)")
    args = ap.parse_args(argv)
    try:
        for ip in args.ip:
            ipaddress.ip_address(ip)
    except ValueError as err:
        ap.error(f"--ip: {err}")
    bad = [n for n in args.node if not NODE_NAME.match(n)]
    if bad:
        ap.error(f"--node: names must match {NODE_NAME.pattern}: {', '.join(bad)}")
    if len(set(args.node)) != len(args.node):
        ap.error("--node: names must be distinct")
    if not (args.host or args.ip or args.node):
        ap.error("give --host/--ip (CA and SuperLink certificate) and/or --node (SuperNode key pairs)")
    if args.days < 1:
        ap.error("--days: at least 1")
    try:
        write(plan(args.out, args.host, args.ip, args.node, args.days))
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(placement(args.out, args.host, args.ip, args.node, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
