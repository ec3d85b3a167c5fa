"""The live server against its own OpenAPI document (``/openapi.json``,
megafs/server/openapi.py), fuzzed by schemathesis: for requests generated
from the schema, valid and not, the server never answers 5xx, and every
answer has a documented status, content type, headers and body.

The server is the attack surface a hostile *client* sees; the clients
trust none of it either, but a 500 is a bug (an unhandled input) and an
answer off the schema is one the real client may refuse. Each operation
runs with a fresh account (its token in every request), so an operation
that ends its session (``/logout``) only costs its own examples. The
number of examples is bounded so the module takes well under a minute.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from megafs.server.openapi import openapi_document
from megafs.wire import API_PREFIX
from tests.helpers.server import ServerProcess, running_server
from tests.integration.conftest import SHARED_SERVER_ARGS
from tests.integration.users import Creds

#: Examples per operation: about 20 operations, a few ms each.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own: fuzzing creates accounts and fails logins."""
    with running_server(
        tmp_path_factory.mktemp("schemathesis") / "data", args=SHARED_SERVER_ARGS
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(api_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


@pytest.fixture
def token(api_server: ServerProcess) -> str:
    creds = Creds.random()
    creds.email = f"fuzz-{uuid.uuid4().hex[:12]}@example.org"
    answer = httpx.post(f"{api_server.url}{API_PREFIX}/signup", json=creds.signup_json())
    answer.raise_for_status()
    return str(answer.json()["token"])


#: (method, path) of every operation the server documents. The live
#: document is what is tested; this list only names the test cases (the
#: schemathesis pytest plugin's ``from_fixture`` does not work with the
#: pytest this project uses).
OPERATIONS = [
    (method.upper(), path)
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method in ("get", "put", "post", "delete", "patch")
]


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_matches_its_schema(
    api_schema: schemathesis.BaseSchema,
    api_server: ServerProcess,
    token: str,
    method: str,
    path: str,
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Case) -> None:
        case.call_and_validate(
            base_url=api_server.url,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            timeout=30,
        )

    check()
