"""Shared fixtures: private Mosquitto brokers (never the system broker on 1883)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import Broker, make_password_file, mosquitto_passwd_path, mosquitto_path

REPO = Path(__file__).resolve().parent.parent
DEPLOY_ACL = REPO / "deploy" / "mosquitto" / "acl"

#: Accounts of the ACL broker: name -> password (made at test time, hashed by mosquitto_passwd).
ACL_USERS = {"twin": "twin-secret", "operator": "operator-secret", "viewer": "viewer-secret"}


def _need_mosquitto() -> None:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (scripts/test.sh installs it)")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh anonymous broker on a free loopback port; `broker.restart()` keeps the port."""
    _need_mosquitto()
    b = Broker(tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker with the shipped ACL (deploy/mosquitto/acl) and a password file made now with
    `mosquitto_passwd -b` for the accounts in ACL_USERS; anonymous clients are refused."""
    _need_mosquitto()
    if mosquitto_passwd_path() is None:
        pytest.skip("mosquitto_passwd is not installed (package mosquitto)")
    d = tmp_path / "mosquitto-acl"
    d.mkdir()
    passwd = make_password_file(d / "passwd", ACL_USERS)
    acl = d / "acl"
    acl.write_text(DEPLOY_ACL.read_text())
    b = Broker(d, password_file=passwd, acl_file=acl)
    b.start()
    try:
        yield b
    finally:
        b.stop()
