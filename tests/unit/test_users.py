"""The user secret store (router/users.py) and the users part of the repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import router.users as users_module
from router.check import check_settings, check_users
from router.db import make_engine, upgrade
from router.db.repository import AlreadyExists, InvalidValue, NotFound, Repository
from router.settings import SettingsError, load_settings
from router.users import (
    IdentityCheck,
    StoredUser,
    hash_passcode,
    verify_passcode,
)


@pytest.fixture(scope="module")
def alice() -> StoredUser:
    return StoredUser("alice", hash_passcode(b"correct horse"))


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Repository]:
    url = f"sqlite:///{tmp_path / 'router.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield Repository(engine)
    engine.dispose()


def test_a_digest_verifies_its_passcode_only(alice: StoredUser) -> None:
    assert alice.secret is not None
    assert verify_passcode(b"correct horse", alice.secret)
    assert not verify_passcode(b"correct horse ", alice.secret)
    assert not verify_passcode(b"", alice.secret)
    assert b"correct horse" not in alice.secret.digest + alice.secret.salt


def test_each_digest_has_its_own_salt() -> None:
    one, two = hash_passcode(b"same"), hash_passcode(b"same")
    assert one.salt != two.salt and one.digest != two.digest
    assert len(one.salt) == 16 and len(one.digest) == 32
    assert one.params == "16384:8:1"


def test_unreadable_parameters_never_verify(alice: StoredUser) -> None:
    assert alice.secret is not None
    broken = users_module.Secret(alice.secret.salt, alice.secret.digest, "x")
    assert not verify_passcode(b"correct horse", broken)


def _check(mode: str, *users: StoredUser) -> IdentityCheck:
    return IdentityCheck(mode, lambda: {u.name: u for u in users})


def test_password_mode(alice: StoredUser) -> None:
    check = _check("password", alice, StoredUser("bob", None))
    assert check.decide(2, b"alice", b"correct horse").accepted
    assert check.decide(2, b"alice", b"wrong").why == "wrong passcode"
    assert check.decide(1, b"alice", b"").why == "a passcode is required (identity type 2)"
    assert check.decide(2, b"mallory", b"correct horse").why == "unknown user"
    assert check.decide(2, b"bob", b"anything").why == "the user has no passcode"
    assert check.decide(None, b"", b"").why == "no user identity offered (required)"
    assert check.decide(2, b"alice", b"x" * 1025).why == "passcode too long"


def test_username_mode(alice: StoredUser) -> None:
    check = _check("username", alice)
    assert check.decide(1, b"alice", b"").accepted
    assert check.decide(2, b"alice", b"whatever").accepted
    assert not check.decide(1, b"bob", b"").accepted


@pytest.mark.parametrize("kind", [3, 4, 5, 0, 255])
def test_sec_08_other_identity_types_are_refused_when_identity_is_required(
    alice: StoredUser, kind: int
) -> None:
    verdict = _check("password", alice).decide(kind, b"A" * 65535, b"")
    assert not verdict.accepted and "not supported" in verdict.why


def test_a_repeated_passcode_is_hashed_once(
    alice: StoredUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = users_module.verify_passcode

    def counting(passcode: bytes, secret: users_module.Secret) -> bool:
        calls.append(passcode)
        return real(passcode, secret)

    monkeypatch.setattr(users_module, "verify_passcode", counting)
    check = _check("password", alice)
    for _ in range(5):
        assert check.decide(2, b"alice", b"correct horse").accepted
        assert not check.decide(2, b"alice", b"wrong").accepted
    assert len(calls) == 2


def test_the_users_are_read_again_after_the_refresh(alice: StoredUser) -> None:
    table: dict[str, StoredUser] = {}
    check = IdentityCheck("password", lambda: dict(table), refresh=0)
    assert not check.decide(2, b"alice", b"correct horse").accepted
    table["alice"] = alice
    assert check.decide(2, b"alice", b"correct horse").accepted


def test_repository_users(repository: Repository, alice: StoredUser) -> None:
    repository.add_user("alice", alice.secret)
    repository.add_user("bob", None)
    with pytest.raises(AlreadyExists):
        repository.add_user("alice", None)
    with pytest.raises(InvalidValue):
        repository.add_user("", None)
    assert [(u.name, u.has_passcode) for u in repository.list_users()] == [
        ("alice", True),
        ("bob", False),
    ]
    stored = repository.user_secrets()
    assert stored["alice"] == alice and stored["bob"] == StoredUser("bob", None)
    repository.remove_user("bob")
    with pytest.raises(NotFound):
        repository.remove_user("bob")
    assert [u.name for u in repository.list_users()] == ["alice"]


def test_security_user_identity_setting() -> None:
    assert load_settings(environ={}).security.user_identity == "none"
    env = {"DICOM_ROUTER_SECURITY_USER_IDENTITY": "password"}
    assert load_settings(environ=env).security.user_identity == "password"
    with pytest.raises(SettingsError, match=r"security\.user_identity must be one of"):
        load_settings(environ={"DICOM_ROUTER_SECURITY_USER_IDENTITY": "kerberos"})


def test_check_names_user_identity() -> None:
    def found(env: dict[str, str]) -> dict[str, str]:
        return {
            f.setting + "=" + f.value: f.level for f in check_settings(load_settings(environ=env))
        }

    assert found({})["security.user_identity=none"] == "open"
    username = found({"DICOM_ROUTER_SECURITY_USER_IDENTITY": "username"})
    assert username["security.user_identity=username"] == "note"
    password = found({"DICOM_ROUTER_SECURITY_USER_IDENTITY": "password"})
    assert password["security.user_identity=password"] == "note"  # no listener TLS
    assert not any(k.startswith("security.user_identity=none") for k in password)


def test_check_users(repository: Repository) -> None:
    assert [f.setting for f in check_users([], "password")] == ["users"]
    assert list(check_users([], "none")) == []
    repository.add_user("bob", None)
    findings = list(check_users(repository.list_users(), "password"))
    assert [(f.setting, f.value) for f in findings] == [("users.bob", "no passcode")]
