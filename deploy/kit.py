"""Operator kit: everything a Flower 1.41 deployment with TLS and SuperNode authentication needs.

Needs only the ``cryptography`` package (installed with flwr)::

    python -m deploy.kit certs --host superlink.example.org --ip 10.0.0.5 --node gpu1 --node gpu2

writes into ``certs/``:

- ``ca.crt``, ``ca.key``: a certificate authority (keep ``ca.key`` offline; ``ca.crt`` goes everywhere)
- ``superlink.crt``, ``superlink.key``: the SuperLink's TLS certificate for the host names and IPs given
- ``nodes/NAME.key``, ``nodes/NAME.pub``: one P-384 key pair per SuperNode; the private key in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``), the
  public key as an ``ecdsa-sha2-nistp384`` SSH line (what ``flwr supernode register`` takes)
- with ``--front-door``: ``frontdoor/nginx.conf`` and ``frontdoor/fleet.conf``, nginx's configuration for the
  front door (``deploy/frontdoor.py``): TLS on ``--port`` (default 8000), only the Fleet API passed on to the
  SuperLink on ``127.0.0.1:--superlink-port`` (default 8001); alone (no ``--host``/``--ip``) it is added to an
  existing kit, e.g. on the SuperLink machine with its copy of ``ca.crt`` and ``superlink.*``

The SuperLink certificate also names ``localhost`` and ``127.0.0.1``: the front door, the SuperLink's own
ServerApp and an operator's SSH tunnel reach it there.

It never overwrites a file: when any target exists it stops before writing anything (exit 1). With
``--node`` alone (no ``--host``/``--ip``) it only adds node key pairs, e.g. for a machine that joins later.

Every argument is checked before anything is made; a bad one exits 2 with one line naming the option
and the value: ``--host`` takes one DNS name (RFC 1123 labels; no wildcard, URL, port, space, comma or
IP address), ``--ip`` one IPv4 or IPv6 address (no brackets, port, prefix or zone), ``--days`` 1..3650;
``--superlink-port`` and ``--listen`` (an IP address for nginx to bind) only with ``--front-door``, the two
ports distinct, the kit's path one nginx can quote.
The kit is written atomically: staged in a temporary sibling folder and renamed into place (or, added
to an existing kit, linked in file by file and taken out again on a failure), so a failed write (exit 1)
leaves nothing behind and an earlier kit as it was. Private keys are mode 0600 whatever the umask.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.frontdoor import (
    DEFAULT_SUPERLINK_PORT,
    LOOPBACK_IP,
    LOOPBACK_NAME,
    Door,
    certificate_host,
    certificate_problem,
    instructions,
    listen_problem,
    path_problem,
)

CURVE = ec.SECP384R1()
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")  # RFC 1123: letters, digits, inner hyphens
MAX_HOST = 253  # characters of a DNS name (RFC 1035), dots included
MAX_DAYS = 3650  # ten years: a longer-lived CA is a key nobody will remember to rotate
MAX_NODES = 1000  # SuperNode key pairs in one call
MAX_NAMES = 100  # host names and IP addresses in one certificate
PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644
CN_LIMIT = 64  # X.509's upper bound on a common name


class KitError(ValueError):
    """A bad argument: the message names the option and the value."""


@dataclass
class Plan:
    """The files one call writes (path -> bytes) and their modes."""

    files: dict[Path, bytes]
    private: set[Path]
    out: Path  # the kit's folder: every file lies under it


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
    """The SuperLink's TLS certificate: every host name and IP address in its SAN, and the loopback's
    (localhost, 127.0.0.1: what the front door, the SuperLink's own ServerApp and an operator's SSH
    tunnel connect to); the common name is the first given name that fits."""
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    names = hosts + [LOOPBACK_NAME] * (LOOPBACK_NAME not in {h.lower() for h in hosts})
    addresses = [ipaddress.ip_address(i) for i in ips]
    addresses += [ipaddress.ip_address(LOOPBACK_IP)] * (ipaddress.ip_address(LOOPBACK_IP) not in addresses)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in names]
    san += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(next((n for n in hosts + ips if len(n) <= CN_LIMIT), "iet-agc SuperLink")))
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


def plan(out: Path, hosts: list[str], ips: list[str], nodes: list[str], days: int, door: Door | None = None) -> Plan:
    """Every file of one call, made in memory: CA and certificate (with ``hosts``/``ips``), node key
    pairs, the front door's nginx configuration (with ``door``)."""
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
    if door is not None:  # its paths are absolute (nginx reads them from its own folder)
        files |= {out / path.relative_to(door.kit): data for path, data in door.files().items()}
    return Plan(files, private, out)


def write(p: Plan) -> None:
    """Write every file, or none: never overwrites, and leaves nothing behind when a write fails.

    The files are staged in a temporary sibling folder of ``p.out`` first. A new kit folder is that
    folder renamed into place; files added to an existing kit are linked (or copied) in one by one
    without replacing anything, and taken out again if one of them fails. Private keys are mode 0600.
    """
    existing = sorted(str(f) for f in p.files if f.exists() or f.is_symlink())
    if existing:
        raise FileExistsError("refusing to overwrite existing files: " + ", ".join(existing))
    made = _make_folders(p.out.parent)
    stage: Path | None = None
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{p.out.name}.kit-", dir=p.out.parent))
        for path, data in p.files.items():
            staged = stage / path.relative_to(p.out)
            staged.parent.mkdir(exist_ok=True)
            _write_file(staged, data, PRIVATE_MODE if path in p.private else PUBLIC_MODE)
        if _rename_into_place(stage, p.out):
            stage = None  # it is the kit now
        else:
            _merge(stage, p)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if stage is not None:  # merged into the existing kit: the staged copies go
        shutil.rmtree(stage, ignore_errors=True)


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns those made, outermost first (to undo)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
    except OSError:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return made


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """One new file with exactly ``mode`` (whatever the umask), flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # O_EXCL: never clobber, even in a race
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # ours (O_EXCL made it): no half-written file stays
        raise
    finally:
        os.close(fd)


def _rename_into_place(stage: Path, out: Path) -> bool:
    """Rename the staged folder to ``out`` when there is none yet (True), else leave it (False)."""
    if out.exists() or out.is_symlink():
        return False
    umask = os.umask(0)
    os.umask(umask)
    for folder in (stage, *(p for p in stage.rglob("*") if p.is_dir())):
        folder.chmod(0o777 & ~umask)  # as mkdir would have made it (mkdtemp makes 0700)
    try:
        os.rename(stage, out)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):  # made meanwhile: add to it instead
            return False
        raise
    return True


def _merge(stage: Path, p: Plan) -> None:
    """Add the staged files to the existing folder ``p.out``, none replacing a file; on any failure
    the files and folders added so far are removed again, so the kit there is as it was."""
    placed: list[Path] = []
    made: list[Path] = []
    try:
        for path in p.files:
            if not path.parent.is_dir():
                path.parent.mkdir()
                made.append(path.parent)
            _place(stage / path.relative_to(p.out), path)
            placed.append(path)
    except BaseException:
        for path in reversed(placed):
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _place(staged: Path, target: Path) -> None:
    """``staged`` at ``target``, which must not exist: a hard link, or a copy where links fail."""
    try:
        os.link(staged, target)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing files: {target}") from None
    except OSError:  # no hard links here (another file system under a symlink, some network mounts)
        _write_file(target, staged.read_bytes(), stat.S_IMODE(staged.stat().st_mode))


def placement(
    out: Path, hosts: list[str], ips: list[str], nodes: list[str], port: int, door: Door | None = None
) -> str:
    """Where each file goes: which machine, which flag; with ``door``, how to run the front door."""
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
    if door is not None:
        rows += [
            (f"{door.folder}/nginx.conf", "SuperLink machine: nginx -c (this user's nginx; pid, logs inside)"),
            (f"{door.folder}/fleet.conf", "the front door itself: included by nginx.conf, or /etc/nginx/conf.d"),
        ]
    width = max(len(path) for path, _ in rows)
    lines = ["Where each file goes (NAME: the user's SuperLink connection):"]
    lines += [f"  {path:<{width}}  {what}" for path, what in rows]
    if hosts or ips:
        lines.append(
            f"The SuperLink certificate is valid for {', '.join(hosts + ips)}: connect to one of them, e.g. {addr}"
            f" (and for {LOOPBACK_NAME}, {LOOPBACK_IP}: the loopback side)."
        )
    lines.append("Run flower-superlink with --enable-supernode-auth: only registered node keys are admitted.")
    if door is not None:
        lines += instructions(door, (hosts or ips or [certificate_host(door.kit) or "SUPERLINK"])[0])
    return "\n".join(lines)


# ---- checking the arguments ---------------------------------------------------------------
def host_problem(name: str) -> str:
    """Why ``name`` is no DNS name for a certificate ('' when it is one): RFC 1123 labels of letters,
    digits and inner hyphens, at most 63 characters each and 253 in all; no wildcard, URL, port,
    IP address (that is ``--ip``), space, comma, trailing dot or all-numeric last label."""
    if not name.strip():
        return "empty"
    if any(c.isspace() for c in name):
        return "contains white space; give one name per --host"
    if "," in name:
        return "one name per --host (repeat --host for more)"
    if "://" in name or "/" in name:
        return "a host name, not a URL or a path (e.g. superlink.example.org)"
    if "*" in name:
        return "no wildcards: name each host the SuperLink is reached by"
    if _ip(name) is not None or (name.startswith("[") and _ip(name.strip("[]")) is not None):
        return "an IP address: give it with --ip"
    if ":" in name:
        return "no port here (the port is --port)"
    if not name.isascii():
        return "not ASCII: give an internationalised name in its xn-- form"
    if name.endswith("."):
        return "no trailing dot"
    if len(name) > MAX_HOST:
        return f"{len(name)} characters, at most {MAX_HOST}"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "an empty label (two dots, or a leading dot)"
        if len(label) > 63:
            return f"label {label[:20]}... is {len(label)} characters, at most 63"
        if not LABEL.fullmatch(label):
            return f"label {label!r}: letters, digits and inner hyphens only (RFC 1123)"
    if labels[-1].isdigit():
        return "its last label is all digits: neither a host name nor an IP address"
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_problem(text: str) -> str:
    """Why ``text`` is no IP address for a certificate ('' when it is one): one IPv4 or IPv6 address,
    without brackets, port, prefix length or zone, and not the unspecified or a multicast address."""
    if not text.strip():
        return "empty"
    if any(c.isspace() for c in text):
        return "contains white space; give one address per --ip"
    if "," in text:
        return "one address per --ip (repeat --ip for more)"
    if "://" in text:
        return "an IP address, not a URL"
    if "/" in text:
        return "one address, not a network (no /prefix)"
    if text.startswith("["):
        return "without brackets (e.g. --ip ::1)"
    if "%" in text:
        return "no zone index (%...): a certificate holds the address alone"
    address = _ip(text)
    if address is None:
        if re.fullmatch(r"[0-9.]+:[0-9]*", text):
            return "no port here (the port is --port)"
        if not host_problem(text):
            return "not an IPv4 or IPv6 address (a host name goes to --host)"
        return "not an IPv4 or IPv6 address"
    if address.is_unspecified:
        return "the unspecified address names no host; give the address clients connect to"
    if address.is_multicast:
        return "a multicast address names no host"
    return ""


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before anything is made: a KitError names the option and the value."""
    if not 1 <= args.days <= MAX_DAYS:
        raise KitError(f"--days: {args.days}: must be 1..{MAX_DAYS}")
    if not 1 <= args.port <= 65535:
        raise KitError(f"--port: {args.port}: must be 1..65535")
    if (args.out.exists() or args.out.is_symlink()) and not args.out.is_dir():
        raise KitError(f"out: {str(args.out)!r} exists and is not a folder")
    for option, values, problem in (("--host", args.host, host_problem), ("--ip", args.ip, ip_problem)):
        for value in values:
            reason = problem(value)
            if reason:
                raise KitError(f"{option}: {value!r}: {reason}")
    _distinct("--host", args.host, str.lower)
    _distinct("--ip", args.ip, ipaddress.ip_address)
    if len(args.host) + len(args.ip) > MAX_NAMES:
        raise KitError(f"--host/--ip: {len(args.host) + len(args.ip)} names, at most {MAX_NAMES} in one certificate")
    if len(args.node) > MAX_NODES:
        raise KitError(f"--node: {len(args.node)} nodes, at most {MAX_NODES} in one call")
    for node in args.node:
        if not NODE_NAME.fullmatch(node):
            raise KitError(f"--node: {node!r}: a name must match {NODE_NAME.pattern}")
    _distinct("--node", args.node, str.lower)  # gpu1 and GPU1 would be one file on some file systems
    check_front_door(args)
    if not (args.host or args.ip or args.node or args.front_door):
        raise KitError(
            "give --host/--ip (CA and SuperLink certificate), --node (SuperNode key pairs) and/or --front-door"
        )


def check_front_door(args: argparse.Namespace) -> None:
    """The front door's options: only with ``--front-door``; its two ports distinct; an address
    nginx can bind; a kit path nginx can read; certificates made now or already in the kit."""
    if not args.front_door:
        for option, value in (("--superlink-port", args.superlink_port), ("--listen", args.listen)):
            if value is not None:
                raise KitError(f"{option}: {value!r}: only with --front-door")
        return
    port = DEFAULT_SUPERLINK_PORT if args.superlink_port is None else args.superlink_port
    if not 1 <= port <= 65535:
        raise KitError(f"--superlink-port: {port}: must be 1..65535")
    if port == args.port:
        raise KitError(f"--superlink-port: {port}: must differ from --port (nginx listens there)")
    if args.listen is not None and listen_problem(args.listen):
        raise KitError(f"--listen: {args.listen!r}: {listen_problem(args.listen)}")
    kit = args.out.resolve()
    if path_problem(kit):
        raise KitError(f"out: {str(kit)!r}: {path_problem(kit)} (the front door's configuration names it)")
    if not (args.host or args.ip) and certificate_problem(kit):
        raise KitError(f"--front-door: {certificate_problem(kit)}")


def front_door(args: argparse.Namespace) -> Door | None:
    """The checked front door of ``args`` (None without ``--front-door``)."""
    if not args.front_door:
        return None
    port = DEFAULT_SUPERLINK_PORT if args.superlink_port is None else args.superlink_port
    return Door(args.out.resolve(), args.port, port, args.listen)


def _folder(text: str) -> Path:
    """The positional ``out``: a folder name (an empty one would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty folder name")
    return Path(text)


def _distinct(option: str, values: list[str], key) -> None:
    seen: dict = {}
    for value in values:
        if key(value) in seen:
            raise KitError(f"{option}: {value!r}: given twice (as {seen[key(value)]!r})")
        seen[key(value)] = value


def parser() -> argparse.ArgumentParser:
    """The kit's options; an error exits 2 with one line."""
    ap = argparse.ArgumentParser(
        prog="python -m deploy.kit",
        description="Make a CA, a SuperLink TLS certificate and SuperNode key pairs for a Flower deployment.",
    )

    def one_line(message: str):
        ap.exit(2, f"{ap.prog}: error: {' '.join(message.removeprefix('argument ').split())}\n")

    ap.error = one_line  # type: ignore[method-assign]
    ap.add_argument("out", type=_folder, help="folder to write into (made if missing; files in it are never replaced)")
    ap.add_argument("--host", action="append", default=[], help="a DNS name of the SuperLink (repeat for more)")
    ap.add_argument("--ip", action="append", default=[], help="an IP address of the SuperLink (repeat for more)")
    ap.add_argument("--node", action="append", default=[], help="a SuperNode name: one key pair each (repeat)")
    ap.add_argument("--days", type=int, default=825, help=f"certificate validity in days, 1..{MAX_DAYS} (default 825)")
    ap.add_argument(
        "--port", type=int, default=8000, help="the port SuperNodes connect to (the front door's), default 8000"
    )
    ap.add_argument(
        "--front-door",
        action="store_true",
        help="write frontdoor/nginx.conf and frontdoor/fleet.conf: nginx on --port passes only the Fleet API",
    )
    ap.add_argument(
        "--superlink-port",
        type=int,
        help=f"with --front-door: the SuperLink's port on 127.0.0.1 (default {DEFAULT_SUPERLINK_PORT})",
    )
    ap.add_argument("--listen", help="with --front-door: the address nginx binds (default every IPv4 address)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.kit``: 0 written, 1 not written (a file exists, a write failed), 2 bad arguments.
    An error is one line on stderr; nothing is written before every argument has been checked."""
    ap = parser()
    args = ap.parse_args(argv)
    try:
        check_args(args)
    except KitError as err:
        ap.error(str(err))
    try:
        door = front_door(args)
        write(plan(args.out, args.host, args.ip, args.node, args.days, door))
    except FileExistsError as err:
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        reason = " ".join((err.strerror or str(err)).split()) + (f": {err.filename}" if err.filename else "")
        print(f"{ap.prog}: error: cannot write the kit into {args.out} ({reason}); wrote nothing", file=sys.stderr)
        return 1
    print(placement(args.out, args.host, args.ip, args.node, args.port, door))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
