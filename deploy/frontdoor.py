"""The front door: nginx in front of the SuperLink, passing only the Fleet API.

Flower 1.41's SuperLink serves its Fleet API (what SuperNodes call), its Control API (``flwr
run``, ``ls``, ``stop``, ``log``, ``supernode register``) and its Runtime API (the ServerApp's)
on one host:port, and its open-source build authenticates no account: whoever reaches that port
can submit a run, i.e. code that every SuperNode executes. With the front door the SuperLink
listens on the loopback only; nginx ends TLS on the public port and passes ``POST /v1/fleet/*``
on (to the SuperLink's TLS port, checking its certificate against the deployment's CA); every
other path gets 403 from nginx. The operator reaches the Control API from the SuperLink machine,
or from afar through an SSH tunnel (Flower's CLI cannot present a client certificate).

The kit (``python -m deploy.kit OUT --front-door``) fills in the templates in ``deploy/nginx/``:
``OUT/frontdoor/nginx.conf`` (a whole nginx configuration that an ordinary user runs, its pid,
logs and temporary files inside ``OUT/frontdoor``) and ``OUT/frontdoor/fleet.conf`` (the
front door itself, which the kit's ``nginx.conf`` includes and a system nginx can include from
``/etc/nginx/conf.d``).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "nginx"
FOLDER = "frontdoor"  # inside the kit
DEFAULT_SUPERLINK_PORT = 8001  # the SuperLink's loopback port behind the door
MAX_BODY = "64m"  # one request's body: a weight chunk is 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
LOOPBACK_NAME, LOOPBACK_IP = "localhost", "127.0.0.1"  # what nginx, the ServerApp and the tunnel use
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
NOT_IN_NGINX_PATH = set("\"$;{}\\'") | {chr(c) for c in range(32)} | {chr(127)}  # quoting, variables
SYSTEM_CONF = "/etc/nginx/conf.d/iet-agc-fleet.conf"


@dataclass(frozen=True)
class Door:
    """One front door: nginx on ``listen``:``port`` in front of the SuperLink on the loopback."""

    kit: Path  # the kit's folder, absolute: the certificates nginx loads
    port: int  # the public port, the one SuperNodes connect to
    superlink_port: int  # the SuperLink's port on 127.0.0.1
    listen: str | None = None  # an IP address nginx binds, None for every IPv4 address

    @property
    def folder(self) -> Path:
        return self.kit / FOLDER

    def listen_directive(self) -> str:
        """nginx's ``listen`` argument: ``8000``, ``127.0.0.1:8000`` or ``[::1]:8000``."""
        if self.listen is None:
            return str(self.port)
        host = f"[{self.listen}]" if ipaddress.ip_address(self.listen).version == 6 else self.listen
        return f"{host}:{self.port}"

    def files(self) -> dict[Path, bytes]:
        """The two configuration files, filled in (path -> bytes)."""
        values = {
            "DOOR": str(self.folder),
            "LISTEN": self.listen_directive(),
            "SUPERLINK_PORT": str(self.superlink_port),
            "CERT": str(self.kit / "superlink.crt"),
            "KEY": str(self.kit / "superlink.key"),
            "CA": str(self.kit / "ca.crt"),
            "MAX_BODY": MAX_BODY,
        }
        return {
            self.folder / name: fill((TEMPLATES / f"{name}.template").read_text(), values).encode()
            for name in ("nginx.conf", "fleet.conf")
        }

    def nginx_args(self) -> list[str]:
        """The arguments that point nginx at this door's configuration, prefix and first log."""
        door = str(self.folder)
        return ["-p", door, "-c", f"{door}/nginx.conf", "-e", f"{door}/error.log"]


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``@NAME@`` replaced (a name without a value is a bug in the kit)."""
    missing = set(PLACEHOLDER.findall(template)) - set(values)
    if missing:
        raise KeyError(f"no value for {sorted(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def path_problem(path: Path) -> str:
    """Why nginx cannot take ``path`` in a quoted argument ('' when it can): no quote, ``$`` (a
    variable to nginx), ``;``, brace, backslash or control character."""
    bad = sorted(set(str(path)) & NOT_IN_NGINX_PATH)
    return f"nginx cannot take {', '.join(repr(c) for c in bad)} in a path" if bad else ""


def listen_problem(text: str) -> str:
    """Why ``text`` is no address for nginx to listen on ('' when it is): one IPv4 or IPv6
    address (0.0.0.0 and :: are fine), no brackets, port or zone, not multicast."""
    if not text.strip() or any(c.isspace() for c in text):
        return "one IP address, without white space"
    if text.startswith("["):
        return "without brackets (e.g. --listen ::1)"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return "not an IPv4 or IPv6 address (nginx binds an address, not a host name; no port)"
    return "a multicast address" if address.is_multicast else ""


def certificate_problem(kit: Path) -> str:
    """Why the front door cannot use the certificates already in ``kit`` ('' when it can): it needs
    ``ca.crt``, ``superlink.crt`` (naming localhost and 127.0.0.1) and ``superlink.key``."""
    from cryptography import x509

    missing = [n for n in ("ca.crt", "superlink.crt", "superlink.key") if not (kit / n).is_file()]
    if missing:
        return f"{kit} has no {', '.join(missing)}: give --host/--ip to make them, or copy them there"
    try:
        cert = x509.load_pem_x509_certificate((kit / "superlink.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound, OSError) as err:
        return f"{kit / 'superlink.crt'} cannot be read as the kit's certificate ({err})"
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    if LOOPBACK_NAME not in names or ipaddress.ip_address(LOOPBACK_IP) not in san.get_values_for_type(x509.IPAddress):
        return (
            f"{kit / 'superlink.crt'} does not name {LOOPBACK_NAME} and {LOOPBACK_IP} (the loopback side of the "
            "door): make a new kit"
        )
    return ""


def certificate_host(kit: Path) -> str | None:
    """The first name of the kit's SuperLink certificate other than the loopback's (None if none)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate((kit / "superlink.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound, OSError):
        return None
    names = [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
    return next((n for n in names if n.lower() not in (LOOPBACK_NAME, LOOPBACK_IP)), None)


def nginx_binary() -> str | None:
    """nginx on PATH, or Debian's ``/usr/sbin/nginx`` (not on an ordinary user's PATH); None if neither."""
    found = shutil.which("nginx")
    if found:
        return found
    debian = Path("/usr/sbin/nginx")
    return str(debian) if debian.is_file() else None


def instructions(door: Door, host: str) -> list[str]:
    """What the kit prints about the front door: how to run the SuperLink behind it, how to start
    and stop nginx (as a user, or as the system's service), how nodes and the operator connect."""
    nginx = shlex.join([nginx_binary() or "nginx", *door.nginx_args()])
    where = f"{door.listen or 'every IPv4 address'}:{door.port}"
    return [
        f"Front door (nginx, on the SuperLink machine), configured in {door.folder}:",
        f"  nginx listens on {where} (TLS with superlink.crt) and passes only POST /v1/fleet/* to the",
        f"  SuperLink on 127.0.0.1:{door.superlink_port}; every other path (flwr run, ls, register) gets 403.",
        f"  The SuperLink on the loopback: flower-superlink --host 127.0.0.1 --port {door.superlink_port} ...",
        "  nginx as this user (no root needed on a port >= 1024; pid, logs, temporary files in its folder):",
        f"    check: {nginx} -t",
        f"    start: {nginx}",
        f"    stop:  {nginx} -s quit",
        f"  Or as the system's nginx: sudo cp {door.folder / 'fleet.conf'} {SYSTEM_CONF}",
        "    && sudo nginx -t && sudo systemctl reload nginx",
        f"  SuperNodes: flower-supernode --superlink {host}:{door.port} ...",
        f"  The operator, from afar: ssh -N -L {door.superlink_port}:127.0.0.1:{door.superlink_port} {host},",
        f'    with address = "localhost:{door.superlink_port}" in [superlink.NAME] of $FLWR_HOME/config.toml',
    ]
