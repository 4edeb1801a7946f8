"""``python -m deploy.kit``: every bad argument exits 2 with one line naming the option and the value
and writes nothing; a write that fails leaves nothing behind and an earlier kit as it was; keys 0600.

Everything runs in-process (``deploy.kit.main``); one case runs it as a real process.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from deploy import kit

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m deploy.kit: error: "
LONG_LABEL = "a" * 63
LONG_HOST = ".".join([LONG_LABEL] * 3 + ["b" * 61])  # 253 characters, the most DNS allows

BAD_HOSTS = [
    ("", "empty"),
    (" ", "empty"),
    ("https://x", "not a URL"),
    ("http://superlink.example.org:8000/", "not a URL"),
    ("superlink.example.org/fleet", "not a URL or a path"),
    ("a b", "white space"),
    ("superlink\t", "white space"),
    ("a,b", "one name per --host"),
    ("a.org,b.org", "one name per --host"),
    ("*.example.org", "no wildcards"),
    ("superlink.*", "no wildcards"),
    ("superlink:8000", "no port"),
    ("localhost:", "no port"),
    ("10.0.0.5", "give it with --ip"),
    ("::1", "give it with --ip"),
    ("[::1]", "give it with --ip"),
    ("superlink.example.org.", "no trailing dot"),
    (".superlink", "empty label"),
    ("a..b", "empty label"),
    ("-a.org", "RFC 1123"),
    ("a-.org", "RFC 1123"),
    ("a_b.org", "RFC 1123"),
    ("user@host", "RFC 1123"),
    ("bücher.de", "not ASCII"),
    (LONG_LABEL + "a.org", "at most 63"),
    (LONG_HOST + "c", "at most 253"),
    ("1.2.3", "all digits"),
    ("10.0.0.256", "all digits"),
]
BAD_IPS = [
    ("", "empty"),
    ("https://10.0.0.1", "not a URL"),
    ("10.0.0.1:8000", "no port"),
    ("10.0.0.0/24", "not a network"),
    ("[::1]", "without brackets"),
    ("fe80::1%eth0", "no zone index"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("256.1.1.1", "not an IPv4 or IPv6"),
    ("1.2.3", "not an IPv4 or IPv6"),
    ("01.2.3.4", "not an IPv4 or IPv6"),
    ("1.2.3.4.5", "not an IPv4 or IPv6"),
    ("::1::2", "not an IPv4 or IPv6"),
    ("localhost", "a host name goes to --host"),
    ("10.0.0.1,10.0.0.2", "one address per --ip"),
    ("10.0.0.1 ", "white space"),
    ("*", "not an IPv4 or IPv6"),
]
BAD_NODES = ["a b", "a/b", "../x", ".hidden", "_x", "x" * 65, "", "a,b", "x\n", "ü", "a:b"]
BAD_OPTIONS = [
    # (arguments after the folder, what the one line must name)
    (["--host", "a.org", "--host", "A.org"], ["--host", "'A.org'", "given twice"]),
    (["--ip", "::1", "--ip", "0::1"], ["--ip", "'0::1'", "given twice"]),
    (["--node", "gpu1", "--node", "GPU1"], ["--node", "'GPU1'", "given twice"]),
    (["--node", "gpu1", "--node", "gpu1"], ["--node", "'gpu1'", "given twice"]),
    ([a for i in range(kit.MAX_NODES + 1) for a in ("--node", f"n{i}")], ["--node", "1001 nodes", "at most 1000"]),
    ([a for i in range(kit.MAX_NAMES + 1) for a in ("--host", f"h{i}.org")], ["--host/--ip", "101 names"]),
    (["--host", "a.org", "--days", "0"], ["--days", "0", "1..3650"]),
    (["--host", "a.org", "--days", "-1"], ["--days", "-1", "1..3650"]),
    (["--host", "a.org", "--days", "3651"], ["--days", "3651", "1..3650"]),
    (["--host", "a.org", "--days", "100000"], ["--days", "100000"]),
    (["--host", "a.org", "--days", "x"], ["--days", "'x'"]),
    (["--host", "a.org", "--days", "1.5"], ["--days", "'1.5'"]),
    (["--host", "a.org", "--days", ""], ["--days", "''"]),
    (["--host", "a.org", "--port", "0"], ["--port", "0", "1..65535"]),
    (["--host", "a.org", "--port", "65536"], ["--port", "65536"]),
    (["--host", "a.org", "--port", "http"], ["--port", "'http'"]),
    (["--host"], ["--host", "expected one argument"]),
    (["--host", "a.org", "--bogus"], ["unrecognized arguments", "--bogus"]),
    ([], ["--host/--ip", "--node", "--front-door"]),  # nothing to make
    # the front door's options
    (["--host", "a.org", "--superlink-port", "9000"], ["--superlink-port", "9000", "only with --front-door"]),
    (["--host", "a.org", "--listen", "127.0.0.1"], ["--listen", "'127.0.0.1'", "only with --front-door"]),
    (["--host", "a.org", "--front-door", "--superlink-port", "0"], ["--superlink-port", "0", "1..65535"]),
    (["--host", "a.org", "--front-door", "--superlink-port", "65536"], ["--superlink-port", "65536", "1..65535"]),
    (["--host", "a.org", "--front-door", "--superlink-port", "x"], ["--superlink-port", "'x'"]),
    (
        ["--host", "a.org", "--front-door", "--superlink-port", "8000"],
        ["--superlink-port", "8000", "differ from --port"],
    ),
    (["--host", "a.org", "--front-door", "--port", "9", "--superlink-port", "9"], ["--superlink-port", "9", "differ"]),
    (["--host", "a.org", "--front-door", "--listen", "localhost"], ["--listen", "'localhost'", "not an IPv4"]),
    (["--host", "a.org", "--front-door", "--listen", "127.0.0.1:8000"], ["--listen", "'127.0.0.1:8000'", "no port"]),
    (["--host", "a.org", "--front-door", "--listen", "[::1]"], ["--listen", "'[::1]'", "without brackets"]),
    (["--host", "a.org", "--front-door", "--listen", "224.0.0.1"], ["--listen", "'224.0.0.1'", "multicast"]),
    (["--host", "a.org", "--front-door", "--listen", ""], ["--listen", "''", "white space"]),
    (["--host", "a.org", "--front-door", "--listen", "10.0.0.0/8"], ["--listen", "'10.0.0.0/8'", "not an IPv4"]),
    (["--front-door"], ["--front-door", "has no ca.crt, superlink.crt, superlink.key", "--host/--ip"]),
    (["--node", "a", "--front-door"], ["--front-door", "has no ca.crt"]),  # nodes alone make no certificate
]
BAD_OUTS = [("", "out: empty"), ("afile", "out: ", "exists and is not a folder")]

N_BAD_ARGS = len(BAD_HOSTS) + len(BAD_IPS) + len(BAD_NODES) + len(BAD_OPTIONS) + len(BAD_OUTS)


def run_kit(argv: list[str]) -> int:
    """``main(argv)``'s exit code, argparse's exits included."""
    try:
        return kit.main(argv)
    except SystemExit as end:
        return int(end.code)


def listing(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for a folder) and mode."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, tmp_path: Path, argv: list[str], *named: str) -> None:
    """Exit 2, nothing on stdout, one line naming what it must; no file made under ``tmp_path``."""
    before = listing(tmp_path)
    assert run_kit(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith(PROG), err
    assert "Traceback" not in err
    for part in named:
        assert part in err, (part, err)
    assert listing(tmp_path) == before  # nothing written, no staging folder


@pytest.mark.parametrize(("host", "reason"), BAD_HOSTS)
def test_a_bad_host_name_is_refused_naming_it(tmp_path, capsys, host, reason):
    refused(capsys, tmp_path, [str(tmp_path / "certs"), f"--host={host}"], "--host", repr(host), reason)


@pytest.mark.parametrize(("ip", "reason"), BAD_IPS)
def test_a_bad_ip_address_is_refused_naming_it(tmp_path, capsys, ip, reason):
    refused(capsys, tmp_path, [str(tmp_path / "certs"), "--host", "ok.org", f"--ip={ip}"], "--ip", repr(ip), reason)


@pytest.mark.parametrize("node", BAD_NODES)
def test_a_bad_node_name_is_refused_naming_it(tmp_path, capsys, node):
    refused(capsys, tmp_path, [str(tmp_path / "certs"), "--node", "good", f"--node={node}"], "--node", repr(node))


@pytest.mark.parametrize(("args", "named"), BAD_OPTIONS)
def test_bad_options_are_refused_naming_them(tmp_path, capsys, args, named):
    refused(capsys, tmp_path, [str(tmp_path / "certs"), *args], *named)


@pytest.mark.parametrize("case", BAD_OUTS)
def test_a_bad_output_folder_is_refused(tmp_path, capsys, case):
    name, *named = case
    (tmp_path / "afile").write_text("not a folder\n")
    out = str(tmp_path / name) if name else ""
    refused(capsys, tmp_path, [out, "--node", "a"], *named)
    assert (tmp_path / "afile").read_text() == "not a folder\n"


@pytest.mark.parametrize(
    "host",
    ["localhost", "superlink.example.org", "SuperLink-1.Example.ORG", "xn--bcher-kva.de", "a", "9lives.io", LONG_HOST],
)
def test_good_host_names_pass(host):
    assert kit.host_problem(host) == ""


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.0.0.5", "::1", "2001:db8::5", "fe80::1", "::ffff:10.0.0.1"])
def test_good_ip_addresses_pass(ip):
    assert kit.ip_problem(ip) == ""


def test_a_good_kit_holds_every_name_and_key_with_modes_0600(tmp_path, capsys):
    umask = os.umask(0o000)  # a permissive umask must not loosen the private keys
    try:
        argv = [str(tmp_path / "new" / "certs"), "--host", "localhost", "--host", LONG_HOST, "--ip", "::1"]
        assert run_kit([*argv, "--ip", "127.0.0.1", "--node", "gpu1", "--node", "gpu2", "--days", "3650"]) == 0
    finally:
        os.umask(umask)
    assert "flwr supernode register" in capsys.readouterr().out
    certs = tmp_path / "new" / "certs"
    modes = {path: mode for path, (_, mode) in listing(certs).items()}
    assert modes == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "superlink.crt": 0o644,
        "superlink.key": 0o600,
        "nodes": 0o777,
        "nodes/gpu1.key": 0o600,
        "nodes/gpu1.pub": 0o644,
        "nodes/gpu2.key": 0o600,
        "nodes/gpu2.pub": 0o644,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["new"] and [p.name for p in certs.parent.iterdir()] == ["certs"]
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", LONG_HOST]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")]
    assert server.subject.rfc4514_string() == "CN=localhost"
    load_pem_private_key((certs / "superlink.key").read_bytes(), None)
    load_ssh_private_key((certs / "nodes" / "gpu1.key").read_bytes(), None)
    assert (certs / "nodes" / "gpu1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_a_long_first_name_leaves_the_common_name_to_a_short_one(tmp_path):
    assert run_kit([str(tmp_path / "c"), "--host", LONG_HOST]) == 0  # a common name holds 64 characters at most
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "superlink.crt").read_bytes())
    assert server.subject.rfc4514_string() == "CN=iet-agc SuperLink"


# ---- writes that fail ------------------------------------------------------------------------
def failing(real, at: int, error: BaseException):
    """``real`` that raises ``error`` on its call number ``at`` (0 first) and works otherwise."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) - 1 == at:
            if isinstance(error, OSError) and real is kit._write_file:  # half a file, as a full disk leaves it
                Path(args[0]).write_bytes(b"half")
            raise error
        return real(*args, **kwargs)

    return wrapper


NEW_KIT = ["--host", "localhost", "--ip", "127.0.0.1", "--node", "a", "--node", "b"]  # 8 files


@pytest.mark.parametrize("at", range(8))
def test_a_write_failing_mid_kit_leaves_nothing(tmp_path, capsys, monkeypatch, at):
    monkeypatch.setattr(kit, "_write_file", failing(kit._write_file, at, OSError(errno.ENOSPC, "No space left")))
    assert run_kit([str(tmp_path / "deep" / "er" / "certs"), *NEW_KIT]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(PROG)
    assert "No space left" in err and "wrote nothing" in err
    assert list(tmp_path.iterdir()) == []  # nor the staging folder, nor the folders made above the kit


def test_an_interrupt_mid_kit_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "_write_file", failing(kit._write_file, 3, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        kit.main([str(tmp_path / "certs"), *NEW_KIT])
    assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_leaves_nothing(tmp_path, capsys, monkeypatch):
    real = os.rename

    def rename(src, dst, *a, **k):
        if Path(src).name.startswith(".certs.kit-"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(kit.os, "rename", rename)
    assert run_kit([str(tmp_path / "certs"), *NEW_KIT]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def previous(tmp_path, capsys) -> tuple[Path, dict]:
    """A kit made earlier (CA, certificate, node ``a``) and a snapshot of every file in it."""
    certs = tmp_path / "certs"
    assert run_kit([str(certs), "--host", "localhost", "--node", "a"]) == 0
    capsys.readouterr()
    return certs, listing(tmp_path)


@pytest.mark.parametrize("at", range(6))
def test_adding_nodes_that_fail_mid_way_keeps_the_previous_kit(previous, tmp_path, capsys, monkeypatch, at):
    certs, before = previous
    monkeypatch.setattr(kit, "_place", failing(kit._place, at, OSError(errno.ENOSPC, "No space left")))
    assert run_kit([str(certs), "--node", "b", "--node", "c", "--node", "d"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert listing(tmp_path) == before  # the earlier kit byte for byte, nothing added, no staging left


def test_a_staging_write_failing_keeps_the_previous_kit(previous, tmp_path, monkeypatch):
    certs, before = previous
    monkeypatch.setattr(kit, "_write_file", failing(kit._write_file, 1, OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert run_kit([str(certs), "--node", "b", "--node", "c"]) == 1
    assert listing(tmp_path) == before


def test_nodes_added_to_a_kit_without_nodes_take_their_folder_back_on_failure(tmp_path, capsys, monkeypatch):
    certs = tmp_path / "certs"
    assert run_kit([str(certs), "--host", "localhost"]) == 0
    before = listing(tmp_path)
    monkeypatch.setattr(kit, "_place", failing(kit._place, 1, OSError(errno.EIO, "Input/output error")))
    assert run_kit([str(certs), "--node", "b"]) == 1
    assert listing(tmp_path) == before and not (certs / "nodes").exists()


def test_nodes_are_added_to_a_kit_and_copied_where_links_fail(previous, tmp_path, capsys, monkeypatch):
    certs, before = previous

    def no_links(src, dst, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kit.os, "link", no_links)
    assert run_kit([str(certs), "--node", "b"]) == 0
    after = listing(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # the earlier files untouched
    assert sorted(set(after) - set(before)) == ["certs/nodes/b.key", "certs/nodes/b.pub"]
    assert after["certs/nodes/b.key"][1] == 0o600 and after["certs/nodes/b.pub"][1] == 0o644
    load_ssh_private_key(after["certs/nodes/b.key"][0], None)


def test_an_existing_file_is_never_replaced(previous, tmp_path, capsys):
    certs, before = previous
    assert run_kit([str(certs), "--node", "b", "--node", "a"]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite existing files" in err and "a.key" in err and err.count("\n") == 1
    assert listing(tmp_path) == before


def test_as_a_process_a_url_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "deploy.kit", str(tmp_path / "c"), "--host", "https://superlink.example.org"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"{PROG}--host: 'https://superlink.example.org': {kit.host_problem('https://x')}\n"
    assert list(tmp_path.iterdir()) == []


# ---- the front door ---------------------------------------------------------------------------
def test_a_certificate_also_names_the_loopback(tmp_path):
    """The front door, the SuperLink's own ServerApp and an operator's SSH tunnel reach the
    SuperLink on 127.0.0.1 / localhost: the certificate names them, the common name stays the user's."""
    assert run_kit([str(tmp_path / "c"), "--host", "superlink.example.org", "--ip", "10.0.0.5"]) == 0
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "superlink.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(i) for i in ("10.0.0.5", "127.0.0.1")]
    assert server.subject.rfc4514_string() == "CN=superlink.example.org"


def test_the_front_door_is_written_with_the_kit(tmp_path, capsys):
    certs = tmp_path / "certs"
    argv = [str(certs), "--host", "superlink.example.org", "--node", "gpu1", "--front-door", "--port", "8443"]
    assert run_kit([*argv, "--superlink-port", "9001", "--listen", "::1"]) == 0
    out = capsys.readouterr().out
    door = certs.resolve() / "frontdoor"
    assert {p: m for p, (_, m) in listing(door).items()} == {"nginx.conf": 0o644, "fleet.conf": 0o644}
    nginx_conf, fleet = (door / "nginx.conf").read_text(), (door / "fleet.conf").read_text()
    assert "@" not in nginx_conf + fleet  # every placeholder filled
    assert f'include "{door}/fleet.conf";' in nginx_conf and f'pid "{door}/nginx.pid";' in nginx_conf
    assert "listen [::1]:8443 ssl;" in fleet and "server 127.0.0.1:9001;" in fleet
    assert f'ssl_certificate "{certs.resolve()}/superlink.crt";' in fleet
    assert f'proxy_ssl_trusted_certificate "{certs.resolve()}/ca.crt";' in fleet
    assert "location /v1/fleet/ {" in fleet and "proxy_ssl_verify on;" in fleet
    assert f"-p {door} -c {door}/nginx.conf -e {door}/error.log" in out  # how to start it, printed
    assert "flower-superlink --host 127.0.0.1 --port 9001" in out
    assert "flower-supernode --superlink superlink.example.org:8443" in out
    assert "ssh -N -L 9001:127.0.0.1:9001 superlink.example.org" in out and "/etc/nginx/conf.d/" in out


def test_the_front_door_joins_an_existing_kit(previous, tmp_path, capsys):
    certs, before = previous
    assert run_kit([str(certs), "--front-door"]) == 0  # e.g. on the SuperLink machine, with its copy
    after = listing(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == [
        "certs/frontdoor",
        "certs/frontdoor/fleet.conf",
        "certs/frontdoor/nginx.conf",
    ]
    assert "listen 8000 ssl;" in (certs / "frontdoor" / "fleet.conf").read_text()
    assert "server 127.0.0.1:8001;" in (certs / "frontdoor" / "fleet.conf").read_text()
    capsys.readouterr()
    assert run_kit([str(certs), "--front-door"]) == 1  # never replaced
    assert "refusing to overwrite" in capsys.readouterr().err and listing(tmp_path) == after


def test_a_front_door_failing_mid_way_keeps_the_previous_kit(previous, tmp_path, monkeypatch):
    certs, before = previous
    monkeypatch.setattr(kit, "_place", failing(kit._place, 1, OSError(errno.ENOSPC, "No space left")))
    assert run_kit([str(certs), "--front-door"]) == 1
    assert listing(tmp_path) == before


def test_a_certificate_without_the_loopback_is_refused_for_the_front_door(previous, tmp_path, capsys):
    """A certificate made elsewhere (or by an older kit) that names no loopback: the door's nginx,
    the ServerApp and the tunnel could not check it."""
    certs, _ = previous
    key = kit.ec.generate_private_key(kit.CURVE)
    name = kit._name("superlink.example.org")
    san = x509.SubjectAlternativeName([x509.DNSName("superlink.example.org")])
    when = kit.dt.datetime.now(kit.dt.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(when).not_valid_after(when + kit.dt.timedelta(days=1))
    cert = builder.add_extension(san, critical=False).sign(key, kit.hashes.SHA384())
    (certs / "superlink.crt").chmod(0o644)
    (certs / "superlink.crt").write_bytes(cert.public_bytes(kit.serialization.Encoding.PEM))
    refused(capsys, tmp_path, [str(certs), "--front-door"], "--front-door", "does not name localhost and 127.0.0.1")


def test_a_kit_path_nginx_cannot_quote_is_refused_for_the_front_door(tmp_path, capsys):
    refused(capsys, tmp_path, [str(tmp_path / "a$b"), "--host", "a.org", "--front-door"], "out: ", "'$'")
    refused(capsys, tmp_path, [str(tmp_path / 'a"b'), "--host", "a.org", "--front-door"], "out: ", "'\"'")


def test_a_front_door_added_alone_names_the_certificates_host(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert run_kit([str(certs), "--host", "superlink.example.org", "--ip", "10.0.0.5"]) == 0
    capsys.readouterr()
    assert run_kit([str(certs), "--front-door"]) == 0
    out = capsys.readouterr().out
    assert "flower-supernode --superlink superlink.example.org:8000" in out
    assert "ssh -N -L 8001:127.0.0.1:8001 superlink.example.org" in out
