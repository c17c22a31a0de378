"""The OpenAPI description fuzzed with schemathesis: no request it can make is a 500, and every answer matches
the description (status codes, content types, bodies, the Allow header of a 405).

The fuzzer signs in with an admin's API key, which survives password changes (POST /me/password). Only the
calls that would lock it out are kept from it: changing or removing its own account (PATCH and DELETE
/admin/users/{its id}) and revoking its own key (DELETE /keys/{its key id}, DELETE /admin/keys/{its key id}).
Those operations are still fuzzed with every other id. Everything else it may do, as an admin.
"""

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from core.settings import Settings
from main import create_app
from tests.servers import NO_SIGN_IN_LIMITS, gateway_settings, start_gateway

pytestmark = pytest.mark.storage

# The description as the gateway serves it at /openapi.json, read from an app that is never started, so that
# each operation is its own sub-test (the gateway under fuzz is started by the fixture below).
_SPEC = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(_SPEC)
# Kept small so the suite stays fast, and derandomized so a run is repeatable (the same cases every time).
# FUZZ_MAX_EXAMPLES=500 fuzzes deeper, with fresh random cases on every run.
DEEP_EXAMPLES = os.environ.get("FUZZ_MAX_EXAMPLES")
FUZZ_SETTINGS = settings(
    max_examples=int(DEEP_EXAMPLES or 5),
    deadline=None,
    database=None,
    derandomize=DEEP_EXAMPLES is None,
    suppress_health_check=list(HealthCheck),
)


class Fuzzer:
    """Who the fuzzer is: the ids it must not lock itself out through."""

    user_id: int | None = None
    key_id: int | None = None


@schema.hook
def filter_path_parameters(context, path_parameters) -> bool:
    if path_parameters is None:
        return True
    own_key = "key_id" in path_parameters and path_parameters["key_id"] == Fuzzer.key_id
    own_account = "user_id" in path_parameters and path_parameters["user_id"] == Fuzzer.user_id
    return not (own_key or own_account)


def _fuzzed_gateway(fake_ollama_server, tmp_path_factory, name: str):
    settings = gateway_settings(tmp_path_factory.mktemp(name), fake_ollama_server.url, **NO_SIGN_IN_LIMITS)
    gateway, server = start_gateway(settings)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as admin:
        created = admin.post("/keys", json={"name": "fuzzer"}).json()
        user_id = admin.get("/me").json()["id"]
    return gateway, server, created, user_id


@pytest.fixture(scope="module")
def fuzzed(fake_ollama_server, tmp_path_factory):
    """A gateway of its own for the whole run, and the fuzzer's credentials: an admin's API key."""
    gateway, server, created, Fuzzer.user_id = _fuzzed_gateway(fake_ollama_server, tmp_path_factory, "fuzzed")
    Fuzzer.key_id = created["id"]
    yield gateway, {"Authorization": f"Bearer {created['key']}"}
    server.stop()
    fake_ollama_server.reset()  # the fuzzer pulled, copied and deleted models


@pytest.fixture(scope="module")
def fuzzed_fleet(fake_ollama_server, tmp_path_factory):
    """Another gateway for `/admin/hosts`: the hosts the fuzzer adds (model management then needs
    X-Ollama-Host) and the one it may drain would change what every other operation answers."""
    gateway, server, created, _ = _fuzzed_gateway(fake_ollama_server, tmp_path_factory, "fuzzed-fleet")
    yield gateway, {"Authorization": f"Bearer {created['key']}"}
    server.stop()


def _excluded_checks(case) -> list:
    # Bodies are forwarded to Ollama unchanged and the gateway's own checks are lenient on purpose (an
    # email's surrounding spaces are stripped, `name` stands for `model`): a body the description calls
    # invalid may well be answered, by the gateway or by Ollama. A documented-valid body must be accepted.
    excluded = [negative_data_rejection]
    if (case.method, case.path) == ("POST", "/api/blobs/{digest}"):
        # Ollama refuses a blob whose bytes don't hash to its name, which no schema can say.
        excluded.append(positive_data_acceptance)
    return excluded


def _fuzz_test(operation_id: str):
    """No request schemathesis makes for this operation, in any of its phases (the description's
    examples, coverage of each parameter's edges, random fuzzing) is a 500 or an answer the description
    doesn't allow."""

    @schema.include(operation_id=operation_id).parametrize()
    @FUZZ_SETTINGS
    def test(case, request):
        fixture = "fuzzed_fleet" if case.path.startswith("/admin/hosts") else "fuzzed"
        gateway, headers = request.getfixturevalue(fixture)
        case.call_and_validate(base_url=gateway.url, headers=headers, excluded_checks=_excluded_checks(case))

    return test


# A test function per operation: `schema.parametrize()` on the whole schema makes a test per operation as
# well, but under pytest 9 they share one node id, so pytest counted them as one (a passing run's progress
# column ended at [ 90%]) and `-k` could not pick one.
for _operation_id in sorted(
    operation["operationId"] for operations in _SPEC["paths"].values() for operation in operations.values()
):
    globals()[f"test_openapi_fuzz_{_operation_id}"] = _fuzz_test(_operation_id)


# What the fuzzer found, kept as plain tests (the fuzzer's cases may change with its version).


def test_relay_path_outside_latin1_is_ollamas_404_not_500(client, ollama):
    response = client.get("/v1/models/%F4%80%94%A2%1B")
    assert response.status_code == 404
    assert "not found" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/users/{}"),
        ("PATCH", "/admin/users/{}"),
        ("DELETE", "/admin/users/{}"),
        ("DELETE", "/admin/keys/{}"),
        ("DELETE", "/keys/{}"),
    ],
)
def test_an_id_beyond_the_databases_integers_is_422_not_500(client, method, path):
    response = client.request(method, path.format(2**63), json={} if method == "PATCH" else None)
    assert response.status_code == 422
    assert "user_id" in response.json()["error"] or "key_id" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/keys", "GET, POST"),
        ("/admin/users", "GET, POST"),
        ("/admin/users/999999", "DELETE, GET, PATCH"),
        ("/files/" + "0" * 32 + "_x.txt", "DELETE, GET"),
    ],
)
def test_a_405_lists_every_method_of_the_path_in_allow(client, path, methods):
    response = client.options(path)
    assert response.status_code == 405
    assert response.headers["allow"] == methods
    assert set(response.json()) == {"error"}
