"""The model policy decides on exactly what Ollama will read.

Ollama reads JSON with Go's rules (case-insensitive keys, last one wins, null leaves a string alone, `name`
for `model` on some handlers); the gateway forwards the client's bytes unchanged. These tests send bodies
that Python and Go read differently through the gateway to a fake Ollama that reads them as Go does
(`tests.go_reader`), on every surface that names a model, and check that Ollama never runs a model the
person may not use: the gateway either reads the same model or refuses the body.
"""

import gzip
import itertools
import json
import sys
from collections.abc import Iterator

import httpx
import pytest

from core.errors import GatewayError
from tests.go_reader import STRING, GoBindError, bind, fold_name, trim_space
from tests.servers import RunningGateway, gateway_settings, start_gateway
from tests.surfaces import error_message, model_calls
from upstream.bodies import model_named_in
from upstream.go_json import PARSE_WHOLE_LIMIT, BodyRefused, go_fold, read_fields

ALLOWED = "llama3.2:1b"
SECRET = "llava:7b"
PASSWORD = "carols-long-password"

SHOW = "/api/show"  # ShowHandler: `model`, else the deprecated `name`
CHAT_ALIAS = "/chat"
LONG_S = "\\u017f"  # in JSON text: folds onto `s` in Go


@pytest.fixture(scope="module")
def carols_gateway(fake_ollama_server, tmp_path_factory) -> Iterator[RunningGateway]:
    gateway, server = start_gateway(
        gateway_settings(tmp_path_factory.mktemp("carol"), fake_ollama_server.url)
    )
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as admin:
        created = admin.post(
            "/admin/users", json={"email": "carol@example.com", "password": PASSWORD, "models": [ALLOWED]}
        )
        assert created.status_code == 201
    yield gateway
    server.stop()


@pytest.fixture
def carol(carols_gateway, ollama) -> Iterator[httpx.Client]:
    """A person who may use ALLOWED only, in front of the (reset) fake Ollama."""
    headers = {"Authorization": f"Bearer {carols_gateway.login('carol@example.com', PASSWORD)}"}
    with httpx.Client(base_url=carols_gateway.url, headers=headers, timeout=30) as client:
        yield client


def _rest_of(path: str) -> str:
    """The members of the surface's usual body besides the model, as JSON text."""
    body = dict(model_calls(ALLOWED))[path]
    rest = {key: value for key, value in body.items() if key != "model"} | {"stream": False}
    return json.dumps(rest)[1:-1]


def _body(path: str, members: str) -> bytes:
    return ("{" + members + ", " + _rest_of(path) + "}").encode()


A, S = json.dumps(ALLOWED), json.dumps(SECRET)
# (id, the members naming the model, status on surfaces reading only `model`, status on /api/show)
TRICKS = [
    ("plain-allowed", f'"model": {A}', 200, 200),
    ("plain-secret", f'"model": {S}', 403, 403),
    ("respelt-after", f'"model": {A}, "Model": {S}', 400, 400),
    ("respelt-only", f'"MODEL": {S}', 400, 400),
    ("respelt-mixed-case", f'"mOdEl": {S}', 400, 400),
    ("respelt-with-escapes", f'"model": {A}, "\\u004dodel": {S}', 400, 400),
    ("escaped-exact-secret", f'"mod\\u0065l": {S}', 403, 403),
    ("escaped-exact-allowed", f'"\\u006d\\u006f\\u0064\\u0065\\u006c": {A}', 200, 200),
    ("duplicate", f'"model": {A}, "model": {S}', 400, 400),
    ("duplicate-then-null", f'"model": {S}, "model": null', 400, 400),
    ("null-then-name", f'"model": null, "name": {S}', 400, 403),
    ("empty-then-name", f'"model": "", "name": {S}', 400, 403),
    ("name-only", f'"name": {A}', 400, 200),
    ("model-then-other-name", f'"model": {A}, "name": {S}', 200, 200),
    ("name-respelt", f'"model": "", "NAME": {S}', 400, 400),
    ("non-string-after", f'"model": {A}, "Model": 5', 400, 400),
    ("number", '"model": 5', 400, 400),
    ("nested-decoy", f'"options": {{"model": {S}}}, "model": {A}', 200, 200),
    ("decoy-in-a-string", f'"x": "\\", \\"model\\": \\"{SECRET}", "model": {A}', 200, 200),
    ("lone-surrogate", '"model": "llava:7b\\ud800"', 403, 403),
    ("go-space-around-secret", '"model": "\\u00a0llava:7b\\u3000"', 403, 403),
    # Python's str.strip() removes \x1c, Go's TrimSpace keeps it: not the allowed model for Ollama.
    ("python-only-space", '"model": "\\u001cllama3.2:1b"', 403, 403),
]


def _surfaces() -> list[tuple[str, str, bytes, int]]:
    cases = []
    for path, _ in model_calls(ALLOWED):
        for trick, members, status, show_status in TRICKS:
            cases.append(
                (f"{path} {trick}", path, _body(path, members), show_status if path == SHOW else status)
            )
    return cases


CASES = _surfaces()


def _post(client: httpx.Client, path: str, raw: bytes, **headers: str) -> httpx.Response:
    return client.post(path, content=raw, headers={"Content-Type": "application/json", **headers})


def _assert_ollama_ran_only_allowed(ollama) -> None:
    ran = {request.model for request in ollama.requests if request.model is not None}
    assert ran <= {ALLOWED}, f"Ollama ran {ran - {ALLOWED}}"


@pytest.mark.parametrize(("path", "raw", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_the_policy_decides_on_the_model_ollama_reads(carol, ollama, path, raw, expected):
    response = _post(carol, path, raw)
    assert response.status_code == expected, response.text
    _assert_ollama_ran_only_allowed(ollama)
    if expected == 200:
        assert [request.model for request in ollama.requests] == [ALLOWED]
    else:
        assert ollama.requests == []  # refused by the gateway: nothing reached Ollama
    if expected == 403:
        assert "may not use" in error_message(response)


WHOLE_BODY_TRICKS = [
    ("a-second-object-after-the-first", f'{{"model": {A}}}{{"model": {S}}}'.encode()),
    ("byte-order-mark", b"\xef\xbb\xbf" + f'{{"model": {A}}}'.encode()),
    ("utf-16", f'{{"model": {A}}}'.encode("utf-16")),
    ("not-an-object", f"[{A}]".encode()),
    ("empty", b""),
    ("truncated", f'{{"model": {A}'.encode()),
]


@pytest.mark.parametrize("path", [path for path, _ in model_calls(ALLOWED)])
@pytest.mark.parametrize(("trick", "raw"), WHOLE_BODY_TRICKS, ids=[trick for trick, _ in WHOLE_BODY_TRICKS])
def test_a_body_go_and_python_could_read_differently_is_refused(carol, ollama, path, trick, raw):
    response = _post(carol, path, raw)
    assert response.status_code == 400, response.text
    assert ollama.requests == []


@pytest.mark.parametrize("path", [path for path, _ in model_calls(ALLOWED)])
def test_a_compressed_body_is_refused_since_ollama_would_decompress_it(carol, ollama, path):
    # Ollama decompresses zstd bodies on /v1 before reading them; the gateway reads only what it can check.
    response = _post(carol, path, gzip.compress(_body(path, f'"model": {A}')), **{"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert ollama.requests == []


def test_chat_messages_spelt_another_way_are_refused(carol, ollama):
    # "messages" spelt with two long s binds to Go's `messages` field; the gateway decides on it for /chat.
    raw = f'{{"model": {A}, "messages": [], "me{LONG_S}{LONG_S}ages": [], "stream": false}}'.encode()
    response = _post(carol, CHAT_ALIAS, raw)
    assert response.status_code == 400
    assert "messages" in error_message(response)
    assert ollama.requests == []


def test_v1_models_path_with_dot_segments_is_refused(carol, ollama):
    # A proxy in front of Ollama would resolve /v1/models/../../api/ps into another endpoint.
    response = carol.get("/v1/models/..%2F..%2Fapi%2Fps")
    assert response.status_code == 400
    assert ollama.requests == []


# The gateway's reader against the Go reader, body by body


_KEYS = [
    "model",
    "Model",
    "MODEL",
    "\\u006dodel",
    "\\u004dODEL",
    "name",
    "Name",
    "NAME",
    "nam\\u0065",
    "options",
]
_VALUES = [A, S, '""', "null", "5", '"  "', f'{{"model": {S}}}']


def _generated_bodies() -> list[bytes]:
    """Every object of one to three members from these keys and values (the same key may repeat)."""
    bodies = []
    members = [f'"{key}": {value}' for key, value in itertools.product(_KEYS, _VALUES)]
    for count in (1, 2, 3):
        step = 1 if count < 3 else 7  # a spread of the three-member bodies keeps the test quick
        combos = list(itertools.product(members, repeat=count))[::step]
        bodies += [("{" + ", ".join(combo) + "}").encode() for combo in combos]
    return bodies


def _go_model(raw: bytes, model_fields: tuple[str, ...]) -> str | None:
    """The model Ollama's handler ends up with, or None if it refuses the body."""
    try:
        bound = bind(raw, dict.fromkeys(model_fields, STRING))
    except GoBindError:
        return None
    model = next((bound[field] for field in model_fields if bound.get(field)), "")
    return model if trim_space(model) else None


def _padded(raw: bytes) -> bytes:
    """The same body, past PARSE_WHOLE_LIMIT: read the other way (walked, not parsed whole)."""
    return b'{"padding": "' + b"x" * PARSE_WHOLE_LIMIT + b'", ' + raw.lstrip()[1:]


def _gateway_model(raw: bytes, model_fields: tuple[str, ...]) -> str | None:
    """The model the gateway decides on, or None if it refuses the body (400)."""
    try:
        return model_named_in(read_fields(raw, model_fields), model_fields)
    except (BodyRefused, GatewayError):
        return None


MODEL_FIELDS = [("model",), ("model", "name")]


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("model_fields", MODEL_FIELDS, ids=["model", "model-or-name"])
def test_the_gateways_reader_never_disagrees_with_go(model_fields, size):
    agreed = refused = 0
    for raw in _generated_bodies():
        body = raw if size == "small" else _padded(raw)
        gateway_model = _gateway_model(body, model_fields)
        if gateway_model is None:  # a refusal (400) is always safe
            refused += 1
            continue
        # Whatever the gateway lets through, Go reads the same model (or refuses the body itself).
        assert _go_model(body, model_fields) in (gateway_model, None), body
        agreed += 1
    assert agreed > 50 and refused > 1000  # the corpus exercises both sides


@pytest.mark.parametrize("model_fields", MODEL_FIELDS, ids=["model", "model-or-name"])
def test_small_and_large_bodies_are_decided_alike(model_fields):
    for raw in _generated_bodies():
        assert _gateway_model(raw, model_fields) == _gateway_model(_padded(raw), model_fields), raw


def test_go_fold_catches_every_key_go_folds_onto_an_ascii_letter():
    """Every code point Go's foldName turns into an ASCII letter is folded by the gateway too, so a key
    spelt with it is seen (and refused) as the field it names."""
    missed, extra = [], []
    for code in range(0x80, sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        go, ours = fold_name(char), go_fold(char)
        go_ascii, ours_ascii = go.isascii() and go.isalpha(), ours.isascii() and ours.isalpha()
        if go_ascii and ours != go:
            missed.append(hex(code))
        elif ours_ascii and not go_ascii:
            extra.append(hex(code))
    assert missed == []
    # Only the dotless i, which older Go versions folded to `I`: refusing it as well is harmless.
    assert extra == ["0x131"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"model": "a", "Model": "b"}', "spelt exactly"),
        (b'{"mode\\u017fl": "x", "model": "a"}', None),  # "mode", long s, "l": no field of Ollama's
        (b'{"messages": [], "me\\u017f\\u017fages": []}', "spelt exactly"),
        (b'{"model": "a"} trailing', "nothing after it"),
        (b'{"a": "\\\\", "model": "b"}', None),
    ],
)
@pytest.mark.parametrize("size", ["small", "large"])
def test_read_fields_refuses_what_go_could_read_another_way(raw, error, size):
    try:
        read_fields(raw if size == "small" else _padded(raw), ("model", "messages"))
    except BodyRefused as refused:
        assert error is not None
        assert error in str(refused) or (size == "small" and "not valid JSON" in str(refused))
    else:
        assert error is None
