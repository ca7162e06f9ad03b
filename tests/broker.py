"""A private Mosquitto for the tests: its own config in a temporary directory, a free loopback
port, start / stop / kill / restart (on the same port).

Never the system broker on 1883: every test gets a fresh broker, so retained messages and
sessions cannot leak from one test into another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for p in MOSQUITTO_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


def mosquitto_passwd_path() -> str | None:
    return shutil.which("mosquitto_passwd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Broker:
    """One Mosquitto process on 127.0.0.1:<port>.

    `password_file` / `acl_file`: when given, anonymous clients are refused and the ACL applies
    (the layout of deploy/mosquitto/). The log goes to `<dir>/mosquitto.log`. `config`: the
    whole config file instead (it must listen on `port`; `tls` then only sets the URL scheme).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: TlsFiles | None = None,
        config: str | None = None,
    ) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it)")
        self.exe = exe
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.password_file = password_file
        self.acl_file = acl_file
        self.tls = tls
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if config is None:
            self._write_config()
        else:  # a whole config of the caller's (it must listen on `port`)
            self.conf.write_text(config)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, Mosquitto drops to the `mosquitto` user, which cannot read a pytest
            # tmp dir; stay root (a throwaway broker on loopback).
            lines.append("user root")
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 5.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {err.strip()} "
                    f"{self.log_text()[-2000:]}"
                )
            if _port_open(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate gracefully (SIGTERM), SIGKILL after 3 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a word to its clients."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def restart(self, down_s: float = 0.0) -> None:
        """Kill, stay down `down_s` seconds, start again on the same port."""
        self.kill()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(OSError):
                self.proc.stderr.close()
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path | None = None


_EC = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def _openssl(d: Path, words: str, *more: str) -> None:
    """openssl with the blank-separated `words`, then `more` (arguments with blanks), in d."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl is not installed")
    subprocess.run([exe, *words.split(), *more], check=True, capture_output=True, cwd=d)


def make_tls_files(directory: Path, *, ca_name: str = "fleet-twin test CA") -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl, EC P-256, 1 day)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(d, f"req -x509 {_EC} -keyout ca.key -out ca.crt -days 1 -subj", f"/CN={ca_name}")
    _openssl(d, f"req {_EC} -keyout server.key -out server.csr -subj /CN=127.0.0.1")
    _openssl(
        d,
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt "
        "-days 1 -extfile san.ext",
    )
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key", d / "ca.key")


def make_client_cert(tls: TlsFiles, name: str) -> tuple[Path, Path]:
    """A client certificate (CN=name, extendedKeyUsage clientAuth) signed by the CA of `tls`,
    and its key, next to the CA: (cert, key). `name` is a plain word."""
    if tls.ca_key is None:
        raise ValueError("the CA key is needed to sign a client certificate")
    d = tls.ca_cert.parent
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl(d, f"req {_EC} -keyout {name}.key -out {name}.csr -subj /CN={name}")
    _openssl(
        d,
        f"x509 -req -in {name}.csr -CA {tls.ca_cert.name} -CAkey {tls.ca_key.name} "
        f"-CAcreateserial -out {name}.crt -days 1 -extfile client.ext",
    )
    return d / f"{name}.crt", d / f"{name}.key"


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made with `mosquitto_passwd -b` (hashed, never plain)."""
    exe = mosquitto_passwd_path()
    if exe is None:
        raise RuntimeError("mosquitto_passwd is not installed (package mosquitto)")
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([exe, "-b", str(path), user, password], check=True, capture_output=True)
    return path
