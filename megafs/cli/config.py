"""Where megafs keeps its files, and the remembered account.

Config dir (``--config-dir``, ``$MEGAFS_CONFIG_DIR``, else the XDG config
dir): ``account.json`` names the server and email and keeps, for a mount
started while the server is unreachable, the account's KDF parameters and
keyblob as the server last sent them (ciphertext: only the password opens
it, see docs/security.md); nothing in it unlocks anything. Only ``login
--remember`` stores the unlocked account keys: in the desktop keyring when
one is available, else in ``credentials`` (mode 0600) beside it. Whoever
can read that entry can read the drive: see docs/security.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import platformdirs

__all__ = ["AccountConfig", "Credentials", "OfflineUnlock", "Paths"]

log = logging.getLogger(__name__)
_KEYRING_SERVICE = "megafs"


@dataclass(frozen=True)
class Paths:
    config_dir: Path

    @classmethod
    def from_option(cls, config_dir: str | None) -> Paths:
        chosen = config_dir or os.environ.get("MEGAFS_CONFIG_DIR")
        return cls(Path(chosen) if chosen else Path(platformdirs.user_config_dir("megafs")))

    @property
    def account_file(self) -> Path:
        return self.config_dir / "account.json"

    @property
    def credentials_file(self) -> Path:
        return self.config_dir / "credentials"

    @property
    def mounts_dir(self) -> Path:
        return self.config_dir / "mounts"

    def pid_file(self, mountpoint: Path) -> Path:
        digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
        return self.mounts_dir / f"{digest}.json"

    @staticmethod
    def default_cache_dir(account: AccountConfig) -> Path:
        digest = hashlib.sha256(f"{account.server}\0{account.email}".encode()).hexdigest()[:16]
        return Path(platformdirs.user_cache_dir("megafs")) / digest

    @staticmethod
    def default_server_dir() -> Path:
        return Path(platformdirs.user_data_dir("megafs")) / "server"


@dataclass(frozen=True)
class OfflineUnlock:
    """What a mount needs to unlock the account with the password while the
    server is unreachable: exactly what the server hands any client that
    logs in (format.md sections 4 and 5). The KDF parameters are checked
    against the client minimum again when used, like the server's."""

    kdf: dict[str, Any]
    keyblob: bytes
    root_id: bytes

    def _encode(self) -> dict[str, Any]:
        return {
            "kdf": self.kdf,
            "keyblob": base64.b64encode(self.keyblob).decode(),
            "root_id": self.root_id.hex(),
        }

    @classmethod
    def _decode(cls, data: Any) -> OfflineUnlock:
        if not isinstance(data, dict) or not isinstance(data["kdf"], dict):
            raise TypeError("offline entry is not an object")
        return cls(
            kdf=data["kdf"],
            keyblob=base64.b64decode(data["keyblob"], validate=True),
            root_id=bytes.fromhex(data["root_id"]),
        )


@dataclass(frozen=True)
class AccountConfig:
    server: str
    email: str
    device: str
    #: Set by every login and every mount that reached the server.
    offline: OfflineUnlock | None = None

    @classmethod
    def load(cls, paths: Paths) -> AccountConfig | None:
        try:
            data = json.loads(paths.account_file.read_text())
            offline = data.get("offline")
            return cls(
                server=data["server"],
                email=data["email"],
                device=data["device"],
                offline=None if offline is None else OfflineUnlock._decode(offline),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{paths.account_file} is damaged: {exc}") from exc

    def with_offline(self, kdf: dict[str, Any], keyblob: bytes, root_id: bytes) -> AccountConfig:
        """This account, keeping what the server just sent for offline starts."""
        return replace(self, offline=OfflineUnlock(kdf, keyblob, root_id))

    def save(self, paths: Paths) -> None:
        paths.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data: dict[str, Any] = {"server": self.server, "email": self.email, "device": self.device}
        if self.offline is not None:
            data["offline"] = self.offline._encode()
        _write_private(paths.account_file, json.dumps(data))


def default_device() -> str:
    return socket.gethostname() or "megafs"


@dataclass(frozen=True)
class Credentials:
    """What ``--remember`` keeps: the unlocked account key and a long-lived
    session the server opened after a full login (two-factor code
    included), so mount needs neither the password nor a code. No password
    or password-derived secret is kept: ``megafs sessions revoke`` on
    another device cuts a stolen copy off the server (though not off the
    key: docs/security.md).

    ``auth_secret`` is set only in an entry an earlier megafs wrote, which
    kept that instead of a session; its first use trades it for one.
    """

    master_key: bytes
    root_id: bytes
    session: str | None = None
    auth_secret: bytes | None = None

    def _encode(self) -> str:
        data = {
            "master_key": base64.b64encode(self.master_key).decode(),
            "root_id": self.root_id.hex(),
        }
        if self.session is not None:
            data["session"] = self.session
        if self.auth_secret is not None:
            data["auth_secret"] = base64.b64encode(self.auth_secret).decode()
        return json.dumps(data)

    @classmethod
    def _decode(cls, text: str) -> Credentials:
        data = json.loads(text)
        session = data.get("session")
        auth_secret = data.get("auth_secret")
        if not isinstance(session, str | None) or (session is None and auth_secret is None):
            raise ValueError("no session in the remembered entry")
        return cls(
            master_key=base64.b64decode(data["master_key"]),
            root_id=bytes.fromhex(data["root_id"]),
            session=session,
            auth_secret=None if auth_secret is None else base64.b64decode(auth_secret),
        )

    def save(self, paths: Paths, account: AccountConfig) -> str:
        """Store; returns where ("the keyring" or the file path)."""
        ring = _keyring()
        if ring is not None:
            try:
                ring.set_password(_KEYRING_SERVICE, _ring_user(account), self._encode())
                paths.credentials_file.unlink(missing_ok=True)
                return "the desktop keyring"
            except Exception as exc:  # any keyring backend failure: fall back
                log.warning("keyring unusable (%s); using a private file", exc)
        paths.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(paths.credentials_file, self._encode())
        return str(paths.credentials_file)

    @classmethod
    def load(cls, paths: Paths, account: AccountConfig) -> Credentials | None:
        try:
            return cls._decode(paths.credentials_file.read_text())
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{paths.credentials_file} is damaged: {exc}") from exc
        ring = _keyring()
        if ring is not None:
            try:
                text = ring.get_password(_KEYRING_SERVICE, _ring_user(account))
            except Exception:
                return None
            if text:
                return cls._decode(text)
        return None

    @staticmethod
    def forget(paths: Paths, account: AccountConfig | None) -> None:
        paths.credentials_file.unlink(missing_ok=True)
        ring = _keyring()
        if ring is not None and account is not None:
            with contextlib.suppress(Exception):
                ring.delete_password(_KEYRING_SERVICE, _ring_user(account))


def _ring_user(account: AccountConfig) -> str:
    return f"{account.email} @ {account.server}"


def _keyring():  # type: ignore[no-untyped-def]
    """The desktop keyring if the optional ``keyring`` package finds a real
    one (Secret Service, KWallet), else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:
        return None
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0:
        return None
    return backend


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
