"""Authentication, authorisation and TLS, against Mosquitto running the shipped configuration.

The broker runs `deploy/mosquitto/mosquitto.conf` itself, with only its paths and ports changed
and its commented TLS block switched on (`require_certificate` too, where client certificates
are tested), the shipped `deploy/mosquitto/acl`, and a password file made now with
`mosquitto_passwd`. A throwaway CA, server and client certificates (and an impostor CA) are made
with `openssl` in a temporary directory: no key is committed.

What is shown: TLS clients (the real `fleet-twin serve` and `fleet-twin watch`, the console's link
from `fleet-twin tui`) connect and telemetry flows; plain text to the TLS port, a client trusting
another CA, a missing or foreign client certificate, anonymous clients and a wrong password are
refused (the twin logs one line, keeps retrying, no traceback, and connects once the account is
fixed); a viewer reads telemetry but its commands, and the twin account's, are dropped by the
broker's ACL and never reach the twin; a password is never taken from the command line.
Static checks parse the shipped config and ACL: authentication required, only `operator` may
write `cmd`. (tests/test_mqtt.py has the plain-listener ACL and TLS basics.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import (
    Broker,
    TlsFiles,
    free_port,
    make_client_cert,
    make_password_file,
    make_tls_files,
    mosquitto_passwd_path,
    mosquitto_path,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twin import telemetry
from twin.build import new_twin
from twin.catalog import load_catalog
from twin.cli import main as cli_main
from twin.engine import Engine
from twin.fleet import load_fleet, resolve_fleet_path
from twin.mqtt import BrokerConfig, MqttBridge
from twin.serve import ENV_PASSWORD, ENV_USERNAME

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "mosquitto"
FLEET = "nvidia-groq"
ROOT = telemetry.topic_root(FLEET)
CMD = telemetry.command_topic(FLEET)
CHIP = "groq-decode/0/0"
#: Made at test time; hashed into the broker's password file by mosquitto_passwd.
PASSWORDS = {"twin": "twin-Zq81-secret", "operator": "op-7Hc2-secret", "viewer": "view-Lw55-secret"}


# ------------------------------------------------------------------------------------------------
# the certificates and the deployed broker


@dataclass(frozen=True)
class Pki:
    tls: TlsFiles  # the CA, and the broker's certificate for 127.0.0.1
    certs: dict[str, tuple[Path, Path]]  # account -> (client certificate, key), signed by the CA
    impostor_ca: Path  # another CA (it signed nothing the broker knows)
    impostor: tuple[Path, Path]  # a client certificate signed by the impostor CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    tls = make_tls_files(d / "certs")
    certs = {user: make_client_cert(tls, user) for user in PASSWORDS}
    other = make_tls_files(d / "impostor", ca_name="impostor CA")
    return Pki(tls, certs, other.ca_cert, make_client_cert(other, "operator"))


#: The TLS directives of the shipped config, commented out there.
TLS_DIRECTIVES = ("listener", "cafile", "certfile", "keyfile", "tls_version", "require_certificate")


def deployed_config(d: Path, plain_port: int, tls_port: int, *, require_certificate: bool) -> str:
    """deploy/mosquitto/mosquitto.conf with its paths under `d`, its listeners on loopback ports
    and its TLS block uncommented (`require_certificate` only when asked)."""
    out: list[str] = []
    switched_on: list[str] = []
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        m = re.fullmatch(rf"#\s*(listener 8883|(?:{'|'.join(TLS_DIRECTIVES[1:])}) .*)", line)
        if m:
            line = m.group(1)
            switched_on.append(line.split()[0])
            if line.startswith("require_certificate") and not require_certificate:
                continue
        line = line.replace("/mosquitto/config/", f"{d}/").replace("/mosquitto/data/", f"{d}/data/")
        if line == "listener 1883":
            line = f"listener {plain_port} 127.0.0.1"
        elif line == "listener 8883":
            line = f"listener {tls_port} 127.0.0.1"
        elif line == "log_dest stdout":
            line = f"log_dest file {d}/mosquitto.log"
        out.append(line)
    assert sorted(switched_on) == sorted(TLS_DIRECTIVES), switched_on
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        out.append("user root")  # else Mosquitto drops to `mosquitto`, who cannot read tmp dirs
    return "\n".join(out) + "\n"


@dataclass
class Deployed:
    broker: Broker  # its `port` and `url` are the TLS listener's
    plain_port: int
    dir: Path
    pki: Pki

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def tls_port(self) -> int:
        return self.broker.port

    def password_file(self, user: str, password: str | None = None) -> Path:
        """A file holding the password of `user` (as a client keeps it), mode 0600."""
        p = self.dir / f"{user}.password"
        p.unlink(missing_ok=True)
        p.touch(mode=0o600)
        p.write_text((password or PASSWORDS[user]) + "\n")
        return p

    def context(self, user: str | None = None, *, ca: Path | None = None) -> ssl.SSLContext:
        """A client TLS context trusting `ca` (the broker's CA by default), with the client
        certificate of `user` when given."""
        ctx = ssl.create_default_context(cafile=str(ca or self.pki.tls.ca_cert))
        if user is not None:
            cert, key = self.pki.certs[user]
            ctx.load_cert_chain(cert, key)
        return ctx

    def client(
        self,
        user: str | None,
        *,
        tls: ssl.SSLContext | bool = True,
        port: int | None = None,
        password: str | None = None,
    ) -> aiomqtt.Client:
        """An MQTT 5 client of `user` (None: anonymous) with its password (or `password`), over
        TLS trusting the broker's CA and without a client certificate (or the context `tls`;
        False: plain text)."""
        context = self.context() if tls is True else tls or None
        return aiomqtt.Client(
            "127.0.0.1",
            port or self.tls_port,
            username=user,
            password=password or (PASSWORDS[user] if user else None),
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=context,
            timeout=3,
        )


@contextlib.contextmanager
def deployed_broker(d: Path, pki: Pki, *, require_certificate: bool = False) -> Iterator[Deployed]:
    if mosquitto_path() is None or mosquitto_passwd_path() is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed (scripts/test.sh installs them)")
    d.mkdir(parents=True)
    (d / "data").mkdir()
    shutil.copytree(pki.tls.ca_cert.parent, d / "certs")  # cafile/certfile/keyfile: certs/*
    make_password_file(d / "passwd", PASSWORDS)
    shutil.copy(DEPLOY / "acl", d / "acl")
    plain, port = free_port(), free_port()
    config = deployed_config(d, plain, port, require_certificate=require_certificate)
    b = Broker(d, port=port, tls=pki.tls, config=config)
    b.start()
    try:
        yield Deployed(b, plain, d, pki)
    finally:
        b.stop()


@pytest.fixture
def deployed(tmp_path: Path, pki: Pki) -> Iterator[Deployed]:
    """The shipped config on a TLS listener (server certificate only) and a plain one."""
    with deployed_broker(tmp_path / "mosquitto", pki) as d:
        yield d


@pytest.fixture
def deployed_mtls(tmp_path: Path, pki: Pki) -> Iterator[Deployed]:
    """The shipped config with `require_certificate true`: clients need a certificate."""
    with deployed_broker(tmp_path / "mosquitto", pki, require_certificate=True) as d:
        yield d


# ------------------------------------------------------------------------------------------------
# helpers


def make_engine(speed: float = 20.0) -> Engine:
    catalog = load_catalog()
    twin = new_twin(load_fleet(resolve_fleet_path(FLEET), catalog), catalog, seed=7)
    return Engine(twin, speed=speed, catalog=catalog)


@contextlib.asynccontextmanager
async def running_twin(url: str, **bridge_kw: Any) -> AsyncIterator[tuple[Engine, MqttBridge]]:
    engine = make_engine()
    bridge = MqttBridge(engine, url, **bridge_kw)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    try:
        await bridge.wait_connected(8)
        yield engine, bridge
    finally:
        engine.stop()
        bridge.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def refused(client: aiomqtt.Client, broker: Broker | None = None) -> str:
    """Why a connection attempt is refused: the client's reason, then (with `broker`) what the
    broker logged meanwhile. AssertionError if it is accepted. (A broker that ends the TLS
    handshake or the connection leaves the client waiting for its CONNACK until it times out:
    the broker's log says why.)"""
    seen = len(broker.log_text()) if broker is not None else 0
    try:
        async with asyncio.timeout(8):
            async with client:
                pass
    except aiomqtt.MqttError as e:
        why = " ".join(str(e).split())
    else:
        raise AssertionError("the broker accepted the connection")
    if broker is not None:
        await asyncio.sleep(0.2)
        why += " | broker: " + " ".join(broker.log_text()[seen:].split())
    return why


async def never_connects(config: BrokerConfig, broker: Broker | None = None) -> str:
    """The twin's own connection code (BrokerConfig.client) is refused: the reason."""
    return await refused(config.client(identifier=f"probe-{time.monotonic_ns()}"), broker)


class Reader:
    """A client keeping every decoded message of its subscriptions."""

    def __init__(self, client: aiomqtt.Client, topics: list[str]) -> None:
        self.client = client
        self.topics = topics
        self.got: list[tuple[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Reader:
        await self.client.__aenter__()
        for t in self.topics:
            await self.client.subscribe(t, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            self.got.append((str(m.topic), telemetry.decode_message(m.payload)))

    async def wait(self, pred: Callable[[str, Any], bool], timeout: float = 8.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for topic, msg in self.got:
                    if pred(topic, msg):
                        return msg
                await asyncio.sleep(0.02)


def is_kind(kind: str, **fields: Any) -> Callable[[str, Any], bool]:
    def pred(topic: str, msg: Any) -> bool:
        return msg.__struct_config__.tag == kind and all(
            getattr(msg, k) == v for k, v in fields.items()
        )

    return pred


def chip_states(engine: Engine) -> dict[str, str]:
    out: dict[str, str] = {}
    for msg in engine.snapshot_now():
        if isinstance(msg, telemetry.Chips):
            out.update(zip(msg.ids, msg.state, strict=True))
    return out


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_PASSWORD, ENV_USERNAME)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def start_cli(
    *args: str, env: dict[str, str] | None = None, stdout: int = subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "twin", *args,
        cwd=REPO, env=env or cli_env(), stdin=subprocess.DEVNULL,
        stdout=stdout, stderr=subprocess.PIPE,
    )  # fmt: skip


async def stop(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> tuple[int, str]:
    """SIGTERM, then SIGKILL after `timeout`: (exit status, stderr)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode(errors="replace")
    assert proc.returncode is not None
    return proc.returncode, err


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


# ------------------------------------------------------------------------------------------------
# the shipped files


def conf_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def test_shipped_config_requires_authentication() -> None:
    text = (DEPLOY / "mosquitto.conf").read_text()
    d = conf_directives(text)
    assert d["allow_anonymous"] == ["false"]
    # ... for every listener (per-listener settings would need it per listener)
    assert d["per_listener_settings"] == ["false"]
    assert d["password_file"] == ["/mosquitto/config/passwd"]
    assert d["acl_file"] == ["/mosquitto/config/acl"]
    # nothing switches anonymous access back on, even commented out
    assert not re.search(r"allow_anonymous\s+true", text)
    # the TLS listener is there to switch on, client certificates included
    for directive in TLS_DIRECTIVES:
        assert re.search(rf"^#\s*{directive}\b", text, re.M), directive
    # no secret in the repository: the password file, passwords and keys are made by the user
    secrets = [p.name for p in DEPLOY.iterdir() if p.name == "passwd" or p.suffix in
               (".password", ".key", ".pem", ".crt", ".p12")]  # fmt: skip
    assert not secrets, secrets


def parse_acl(text: str) -> dict[str | None, list[tuple[str, str]]]:
    """user (None: rules before any `user` line, which apply to anonymous clients; `pattern`
    rules under the key "pattern") -> [(access, topic filter)]."""
    rules: dict[str | None, list[tuple[str, str]]] = {}
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user":
            user = " ".join(words[1:])
            rules.setdefault(user, [])
        elif words[0] == "topic":
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules.setdefault(user, []).append((access, topic))
        elif words[0] == "pattern":
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules.setdefault("pattern", []).append((access, topic))
        else:
            raise AssertionError(f"unknown ACL line {raw!r}")
    return rules


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT topic-filter matching (`+` one level, `#` the rest, zero levels included)."""
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def may(rules: list[tuple[str, str]], access: str, topic: str) -> bool:
    return any(a in (access, "readwrite") and topic_matches(f, topic) for a, f in rules)


def test_shipped_acl_only_operator_may_write_cmd() -> None:
    acl = parse_acl((DEPLOY / "acl").read_text())
    assert set(acl) == {"twin", "operator", "viewer"}, "no anonymous, pattern or other rules"
    fleets = [FLEET, "all-vendors", "some-fleet"]
    cmds = [telemetry.command_topic(f) for f in fleets]
    for topic in cmds:
        writers = [u for u, rules in acl.items() if may(rules, "write", topic)]
        assert writers == ["operator"], (topic, writers)
        assert may(acl["twin"], "read", topic)
    telemetry_topics = [
        telemetry.topic_root(f) + s
        for f in fleets
        for s in ("status", "meta", "summary", "tier/h100-prefill", "chips/groq-decode", "event")
    ]
    replies = [ROOT + "reply", ROOT + "reply/console-1"]
    for topic in telemetry_topics + replies:
        assert may(acl["twin"], "write", topic), topic
        assert may(acl["operator"], "read", topic), topic
        assert not may(acl["viewer"], "write", topic), topic
    for topic in telemetry_topics:
        assert may(acl["viewer"], "read", topic), topic
    for topic in [*cmds, *replies]:
        assert not may(acl["viewer"], "read", topic), topic
    # the twin writes nothing outside its topics (a reply_to elsewhere is dropped)
    for topic in ("fleet-twin/v1/x/other", "elsewhere", "fleet-twin/v2/x/cmd", "$SYS/x"):
        assert not may(acl["twin"], "write", topic), topic
    assert not [a for a, _ in acl["viewer"] if a != "read"]


# ------------------------------------------------------------------------------------------------
# TLS


async def test_tls_serve_and_watch_connect_and_telemetry_flows(deployed: Deployed) -> None:
    pki = deployed.pki
    ca = str(pki.tls.ca_cert)
    twin_pw = deployed.password_file("twin")
    serve = await start_cli(
        "serve", FLEET, "--broker", deployed.url, "--tls-ca", ca, "--speed", "5",
        "--username", "twin", "--password-file", str(twin_pw),
    )  # fmt: skip
    try:
        # the viewer's password from the environment, not a file
        watch = await start_cli(
            "watch", "--broker", deployed.url, "--fleet", FLEET, "--json", "--count", "3",
            "--tls-ca", ca, "--username", "viewer",
            env=cli_env(**{ENV_PASSWORD: PASSWORDS["viewer"]}), stdout=subprocess.PIPE,
        )  # fmt: skip
        assert not any(pw in cmdline(p.pid) for pw in PASSWORDS.values() for p in (serve, watch))
        out, werr = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0, werr.decode()
        msgs = [telemetry.decode_message(line) for line in out.decode().splitlines()]
        summaries = [m for m in msgs if isinstance(m, telemetry.Summary)]
        assert len(summaries) == 3
        assert all(s.arrived == s.done + s.rejected + s.in_flight for s in summaries)
        assert [m.state for m in msgs if isinstance(m, telemetry.Status)] == ["online"]
        assert "Traceback" not in werr.decode()
    finally:
        rc, err = await stop(serve)
    assert rc == 0, err
    assert "Traceback" not in err
    assert f"connected to {deployed.url}" in err, err
    assert not any(pw in err for pw in PASSWORDS.values())
    log = deployed.broker.log_text()
    assert "u'twin'" in log and "u'viewer'" in log, log[-2000:]


async def test_plain_text_anonymous_and_wrong_ca_are_refused(deployed: Deployed) -> None:
    pki = deployed.pki
    # plain MQTT to the TLS port, with good credentials
    why = await refused(deployed.client("operator", tls=False), deployed.broker)
    assert "wrong version number" in why, why
    # anonymous: on the plain listener and over TLS
    why = await refused(deployed.client(None, tls=False, port=deployed.plain_port))
    assert "not authori" in why.lower(), why
    assert "not authori" in (await refused(deployed.client(None))).lower()
    # a client that trusts another CA does not accept the broker's certificate
    why = await refused(deployed.client("operator", tls=deployed.context(ca=pki.impostor_ca)))
    assert "certificate verify failed" in why, why
    # ... nor does the twin's own connection code
    cfg = BrokerConfig.make(deployed.url, username="twin", password=PASSWORDS["twin"],
                            tls_ca=str(pki.impostor_ca))  # fmt: skip
    assert "certificate verify failed" in await never_connects(cfg)
    cfg = BrokerConfig.make(
        f"mqtt://127.0.0.1:{deployed.tls_port}", username="twin", password=PASSWORDS["twin"]
    )
    assert "wrong version number" in await never_connects(cfg, deployed.broker)
    # ... while the right CA and account connect
    async with deployed.client("operator"):
        pass


async def test_serve_trusting_a_wrong_ca_logs_one_line_and_keeps_trying(
    deployed: Deployed,
) -> None:
    serve = await start_cli(
        "serve", FLEET, "--broker", deployed.url, "--tls-ca", str(deployed.pki.impostor_ca),
        "--speed", "5", "--username", "twin",
        "--password-file", str(deployed.password_file("twin")),
    )  # fmt: skip
    try:
        await asyncio.sleep(3.0)
        assert serve.returncode is None
    finally:
        rc, err = await stop(serve)
    assert rc == 0 and "Traceback" not in err, err
    warnings = [ln for ln in err.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and "certificate verify failed" in warnings[0], err
    assert "connected to" not in err
    # it kept trying: each attempt ended in the TLS handshake (the twin refused the broker's CA)
    log = deployed.broker.log_text()
    assert log.count("unknown ca") >= 2, log[-2000:]


# ------------------------------------------------------------------------------------------------
# client certificates (require_certificate true)


async def test_client_certificates_where_required(
    deployed_mtls: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = deployed_mtls
    pki = d.pki
    ca = str(pki.tls.ca_cert)
    # no client certificate, or one from another CA: refused (the right password notwithstanding)
    why = await refused(d.client("operator"), d.broker)
    assert "peer did not return a certificate" in why, why
    why = await never_connects(
        BrokerConfig.make(d.url, username="twin", password=PASSWORDS["twin"], tls_ca=ca), d.broker
    )
    assert "peer did not return a certificate" in why, why
    foreign = d.context()
    foreign.load_cert_chain(*pki.impostor)
    why = await refused(d.client("operator", tls=foreign), d.broker)
    assert "certificate verify failed" in why, why
    # a certificate, but no account: still refused
    why = await refused(d.client(None, tls=d.context("viewer")))
    assert "not authori" in why.lower(), why

    # the real `serve`, with its certificate and key
    twin_cert, twin_key = pki.certs["twin"]
    serve = await start_cli(
        "serve", FLEET, "--broker", d.url, "--tls-ca", ca, "--tls-cert", str(twin_cert),
        "--tls-key", str(twin_key), "--speed", "5", "--username", "twin",
        "--password-file", str(d.password_file("twin")),
    )  # fmt: skip
    link = None
    try:
        # the console's link, as `fleet-twin tui` builds it: certificate, key, and the password
        # from the environment
        op_cert, op_key = pki.certs["operator"]
        monkeypatch.setenv(ENV_PASSWORD, PASSWORDS["operator"])
        monkeypatch.delenv(ENV_USERNAME, raising=False)
        captured: dict[str, Any] = {}

        def fake_console(link: Any, *, read_only: bool = False) -> int:
            captured["link"] = link
            return 0

        import tui.app

        monkeypatch.setattr(tui.app, "run_console", fake_console)
        root_level = logging.getLogger().level
        try:
            assert cli_main([
                "tui", "--broker", d.url, "--fleet", FLEET, "--username", "operator",
                "--tls-ca", ca, "--tls-cert", str(op_cert), "--tls-key", str(op_key),
            ]) == 0  # fmt: skip
        finally:
            logging.getLogger().setLevel(root_level)
        link = captured["link"]
        assert link.password == PASSWORDS["operator"] and link.tls_context is not None
        await link.start()
        got: list[Any] = []

        async def read() -> None:
            async for msg in link.messages():
                got.append(msg)

        reader = asyncio.create_task(read())
        try:
            async with asyncio.timeout(20):
                while not any(isinstance(m, telemetry.Summary) for m in got):
                    await asyncio.sleep(0.05)
            assert any(isinstance(m, telemetry.Meta) for m in got)
            reply = await link.command(telemetry.Fail(target=CHIP))
            assert reply.ok, reply
            async with asyncio.timeout(10):
                while not any(
                    isinstance(m, telemetry.Chips)
                    and m.tier == "groq-decode"
                    and dict(zip(m.ids, m.state, strict=True))[CHIP] == "failed"
                    for m in got
                ):
                    await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        if link is not None:
            await link.stop()
        rc, err = await stop(serve)
    assert rc == 0 and "Traceback" not in err, err
    assert f"connected to {d.url}" in err


# ------------------------------------------------------------------------------------------------
# the ACL over TLS: who may command


def request(reply_topic: str, corr: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = corr
    return props


async def test_viewer_and_twin_commands_are_dropped_by_the_broker(deployed: Deployed) -> None:
    ca = str(deployed.pki.tls.ca_cert)
    async with (
        running_twin(deployed.url, username="twin", password=PASSWORDS["twin"], tls_ca=ca) as (
            engine,
            bridge,
        ),
        Reader(deployed.client("operator"), [ROOT + "reply/#", ROOT + "event"]) as op,
        Reader(deployed.client("viewer"), [ROOT + "summary", ROOT + "status"]) as viewer,
        deployed.client("twin") as twin_account,
    ):
        # The viewer reads telemetry ...
        before = await viewer.wait(is_kind("summary"))
        await viewer.wait(is_kind("status", state="online"))
        rate = engine.twin.state.workload.rate_per_s
        # ... but its commands (MQTT 5 with a response topic, 3.1.1 style with reply_to, QoS 0
        # and 1), and the twin account's, never reach the twin.
        sneaky: list[tuple[telemetry.Command, int]] = [
            (telemetry.Fail(id="viewer-1", target=CHIP), 1),
            (telemetry.SetRate(id="viewer-2", rate_per_s=1.0, reply_to=ROOT + "reply/v"), 0),
            (telemetry.Pause(id="viewer-3"), 1),
        ]
        for cmd, qos in sneaky:
            await viewer.client.publish(
                CMD, telemetry.encode(cmd), qos=qos,
                properties=request(ROOT + "reply/v", cmd.id.encode()),
            )  # fmt: skip
        await twin_account.publish(
            CMD, telemetry.encode(telemetry.Pause(id="twin-1", reply_to=ROOT + "reply/t")), qos=1
        )
        # The operator's command, sent after them (each PUBACK came first: the broker has dealt
        # with the others), goes through; its reply_to names `cmd` itself: the twin's reply there
        # is dropped too, so the twin does not command itself.
        await op.client.publish(
            CMD, telemetry.encode(telemetry.Resume(id="op-1", reply_to=CMD)), qos=1
        )
        # and one without any reply topic is answered on <root>reply
        await op.client.publish(CMD, telemetry.encode(telemetry.Resume(id="op-2")), qos=1)
        reply = await op.wait(
            lambda t, m: t == ROOT + "reply" and is_kind("reply", id="op-2")(t, m)
        )
        assert reply.ok
        await asyncio.sleep(0.5)  # anything still on its way would arrive now
        assert bridge.commands == 2, bridge.commands
        replies = [m for _, m in op.got if isinstance(m, telemetry.Reply)]
        assert [r.id for r in replies] == ["op-2"], replies
        events = [m for _, m in op.got if isinstance(m, telemetry.Event)]
        assert [e.event for e in events if e.event != "resumed"] == [], events
        # nothing changed
        assert set(chip_states(engine).values()) == {"up"}
        assert engine.twin.state.workload.rate_per_s == rate and not engine.paused
        after = await viewer.wait(lambda t, m: is_kind("summary")(t, m)
                                  and m.sim_time_s > before.sim_time_s + 1)  # fmt: skip
        assert after.rate_per_s == before.rate_per_s and not after.paused
        # The operator's command takes effect.
        await op.client.publish(
            CMD,
            telemetry.encode(telemetry.Fail(id="op-3", target=CHIP)),
            qos=1,
            properties=request(ROOT + "reply/op", b"3"),
        )
        reply = await op.wait(is_kind("reply", id="op-3"))
        assert reply.ok and chip_states(engine)[CHIP] == "failed"


# ------------------------------------------------------------------------------------------------
# passwords


async def test_wrong_password_is_refused_and_the_twin_keeps_retrying(deployed: Deployed) -> None:
    # a client with a wrong password
    why = await refused(deployed.client("viewer", password="not-the-password"))
    assert "bad user name or password" in why.lower() or "not authori" in why.lower(), why
    # the twin with a wrong password: one log line, retries (debug), no traceback
    wrong = "twin-wrong-password"
    serve = await start_cli(
        "serve", FLEET, "--broker", deployed.url, "--tls-ca", str(deployed.pki.tls.ca_cert),
        "--speed", "5", "--username", "twin", "--log-level", "debug",
        "--password-file", str(deployed.password_file("twin", wrong)),
    )  # fmt: skip
    try:
        log = deployed.broker.log
        seen = len(log.read_text())
        deadline = time.monotonic() + 15
        while log.read_text()[seen:].count("disconnected, not authorised") < 2:  # two attempts
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            assert serve.returncode is None
            await asyncio.sleep(0.1)
        # The account is fixed on the broker (password file reloaded on SIGHUP): the twin's
        # next attempt gets in.
        passwd = make_password_file(deployed.dir / "passwd", {**PASSWORDS, "twin": wrong})
        assert passwd.is_file()
        assert deployed.broker.proc is not None
        deployed.broker.proc.send_signal(signal.SIGHUP)
        async with Reader(deployed.client("viewer"), [ROOT + "status"]) as viewer:
            await viewer.wait(is_kind("status", state="online"), timeout=15)
    finally:
        rc, err = await stop(serve)
    assert rc == 0, err
    assert "Traceback" not in err, err
    warnings = [ln for ln in err.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1, err
    assert "unavailable" in warnings[0]
    assert "not authori" in warnings[0].lower() or "password" in warnings[0].lower(), warnings
    assert len([ln for ln in err.splitlines() if "still unavailable" in ln]) >= 1, err
    assert err.count("connected to") == 1
    assert wrong not in err


@pytest.mark.parametrize("command", ["serve", "watch", "tui", "chaos"])
@pytest.mark.parametrize(
    "form", [["--password", "hunter2"], ["--password=hunter2"], ["--password"]]
)
def test_a_password_on_the_command_line_is_refused(
    command: str, form: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    first = {
        "serve": ["serve", FLEET],
        "watch": ["watch", "--fleet", FLEET],
        "tui": ["tui", "--fleet", FLEET],
        "chaos": ["chaos", "nvidia-groq-lose-prefill"],
    }[command]
    with pytest.raises(SystemExit) as e:
        cli_main([*first, "--broker", "mqtt://127.0.0.1:1", "--username", "u", *form])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--password" in err and "--password-file" in err and ENV_PASSWORD in err
    assert "hunter2" not in err


def test_help_offers_a_password_file_not_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--password-file" in out and ENV_PASSWORD in out
    assert not re.search(r"--password(?!-file)", out)
