"""Every error class maps to one errno and one HTTP status, and the wire
code round-trips, so each boundary translates errors the same way."""

from __future__ import annotations

import errno

import pytest

import megafs.errors as errors
from megafs.errors import MegafsError, error_for_code

CLASSES = [
    getattr(errors, n)
    for n in errors.__all__
    if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), MegafsError)
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_class_has_both_mappings(cls: type[MegafsError]) -> None:
    assert cls.errno in errno.errorcode
    assert 400 <= cls.http_status < 600
    if cls is not MegafsError:
        assert error_for_code(cls.code, cls.http_status) is cls


def test_codes_are_unique() -> None:
    codes = [c.code for c in CLASSES]
    assert len(codes) == len(set(codes))


def test_unknown_code_falls_back_to_status_then_remote_error() -> None:
    assert error_for_code("nonsense", 404) is errors.NotFound
    assert error_for_code("nonsense", 599) is errors.RemoteError


def test_integrity_error_message_is_uniform() -> None:
    assert str(errors.IntegrityError()) == "integrity check failed"
