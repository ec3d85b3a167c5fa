from __future__ import annotations

import pytest

from megafs.crypto import AccountKeys


@pytest.fixture(scope="session")
def account() -> AccountKeys:
    return AccountKeys.from_master(bytes(range(32)), bytes(range(100, 116)))


@pytest.fixture(scope="session")
def other_account() -> AccountKeys:
    """Another account: different master key, same root id."""
    return AccountKeys.from_master(bytes(range(1, 33)), bytes(range(100, 116)))
