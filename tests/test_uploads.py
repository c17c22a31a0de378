"""POST /upload and GET /files: size-capped, traversal-proof, owned by the uploader."""

import os
import select

import httpx
import pytest

from core.settings import MIB
from tests import rawhttp
from tests.databases import execute
from uploads.names import is_stored_name

pytestmark = pytest.mark.storage


def upload(client: httpx.Client, name: str, data: bytes, content_type: str = "text/plain") -> httpx.Response:
    return client.post("/upload", files={"file": (name, data, content_type)})


def test_upload_returns_201_with_a_generated_name(client):
    response = upload(client, "notes.txt", b"hello gateway")
    assert response.status_code == 201
    body = response.json()
    assert is_stored_name(body["filename"])
    assert body["filename"].endswith("_notes.txt")
    assert body["download_path"] == f"/files/{body['filename']}"
    assert body["size"] == len(b"hello gateway")
    assert body["content_type"] == "text/plain"


def test_an_upload_downloads_as_an_attachment_with_the_same_bytes(client):
    data = os.urandom(300_000)
    stored = upload(client, "photo.png", data, "image/png").json()
    response = client.get(stored["download_path"])
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../../escaped.txt", id="dot-dot"),
        pytest.param("..\\..\\escaped.txt", id="backslashes"),
        pytest.param("/etc/cron.d/escaped.txt", id="absolute"),
        pytest.param("....//....//escaped.txt", id="doubled-dots"),
        pytest.param(".htaccess", id="hidden"),
        pytest.param("naïve résumé.txt", id="non-ascii"),
        pytest.param("a" * 300 + ".txt", id="very-long"),
    ],
)
def test_a_hostile_filename_stays_inside_the_uploads_folder(gateway, client, name):
    uploads_dir = gateway.settings.uploads_dir.resolve()
    before = set(gateway.settings.data_dir.resolve().parent.rglob("*escaped*"))
    response = upload(client, name, b"x")
    assert response.status_code == 201
    stored = response.json()["filename"]
    assert is_stored_name(stored)
    assert (uploads_dir / stored).resolve().parent == uploads_dir
    assert (uploads_dir / stored).read_bytes() == b"x"
    assert set(gateway.settings.data_dir.resolve().parent.rglob("*escaped*")) - before <= {
        uploads_dir / stored
    }


@pytest.mark.parametrize(
    "raw_path",
    [
        pytest.param("/files/../secret_key", id="dot-dot"),
        pytest.param("/files/..%2Fsecret_key", id="encoded-slash"),
        pytest.param("/files/%2e%2e%2fsecret_key", id="encoded-dots"),
        pytest.param("/files/%252e%252e%252fsecret_key", id="double-encoded"),
        pytest.param("/files/..%252Fsecret_key", id="double-encoded-slash"),
        pytest.param("/files//etc/passwd", id="absolute"),
        pytest.param("/files/%2Fetc%2Fpasswd", id="encoded-absolute"),
        pytest.param("/files/..%5Csecret_key", id="encoded-backslash"),
        pytest.param("/files/gateway.sqlite3", id="database-by-name"),
        pytest.param("/files/..", id="parent"),
    ],
)
def test_path_traversal_on_files_is_404(gateway, client, raw_path):
    upload(client, "bait.txt", b"bait")  # the folder is not empty: there is something to escape from
    response = rawhttp.get(gateway.url, raw_path, gateway.admin_headers())
    assert response.status_code == 404
    assert b"error" in response.body
    assert (gateway.settings.data_dir / "secret_key").read_bytes() not in response.body


def test_a_missing_file_is_404(client):
    response = client.get("/files/" + "0" * 32 + "_nothing.txt")
    assert response.status_code == 404
    assert response.json() == {"error": "file not found"}


def test_another_users_upload_is_404(gateway, client):
    stored = upload(client, "private.txt", b"for admins only").json()
    gateway.services.users.create("reader@example.com", "reader-password", "user")
    token = gateway.login("reader@example.com", "reader-password")
    response = httpx.get(gateway.url + stored["download_path"], headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("files", "data"),
    [
        pytest.param({"other": ("a.txt", b"x")}, None, id="wrong-field"),
        pytest.param(None, {"file": "just text, not a file"}, id="field-not-a-file"),
    ],
)
def test_an_upload_without_a_file_field_is_400(client, files, data):
    response = client.post("/upload", files=files, data=data)
    assert response.status_code == 400
    assert "file" in response.json()["error"]


def test_a_non_multipart_upload_is_400(client):
    response = client.post("/upload", json={"file": "x"})
    assert response.status_code == 400


def test_a_file_of_exactly_the_cap_is_accepted(make_gateway):
    gateway = make_gateway(max_upload_mb=1)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        response = upload(http, "exact.bin", b"\0" * MIB, "application/octet-stream")
    assert response.status_code == 201
    assert response.json()["size"] == MIB


def test_a_file_just_over_the_cap_is_413_and_not_kept(make_gateway):
    gateway = make_gateway(max_upload_mb=1)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        response = upload(http, "over.bin", b"\0" * (MIB + 1), "application/octet-stream")
    assert response.status_code == 413
    assert "too large" in response.json()["error"]
    assert list(gateway.settings.uploads_dir.iterdir()) == []


@pytest.mark.parametrize(
    "size", [int(1.5 * MIB), 3 * MIB, 40 * MIB], ids=["within-the-framing-allowance", "3-mib", "40-mib"]
)
def test_an_upload_over_the_cap_is_told_the_configured_limit_in_mib(make_gateway, size):
    """One message whatever the size: the cap's allowance for multipart framing is not the person's limit."""
    gateway = make_gateway(max_upload_mb=1)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=60) as http:
        response = upload(http, "big.bin", b"\0" * size, "application/octet-stream")
    assert response.status_code == 413
    assert response.json() == {"error": "file too large: the limit is 1 MiB"}


@pytest.mark.parametrize("configured", ["0.5", "0.01"])
def test_a_request_body_over_its_cap_is_told_the_limit_as_configured_in_mib(make_gateway, configured):
    gateway = make_gateway(max_request_mb=float(configured))
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=60) as http:
        response = http.post("/api/chat", content=b" " * MIB, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"error": f"request body too large: the limit is {configured} MiB"}


def test_an_upload_declared_over_the_cap_is_refused_before_its_body_is_sent(make_gateway):
    gateway = make_gateway(max_upload_mb=1)
    headers = gateway.admin_headers() | {
        "Content-Type": "multipart/form-data; boundary=xyz",
        "Content-Length": str(500 * MIB),
    }
    with rawhttp.open_post(gateway.url, "/upload", headers) as sock:
        response = rawhttp.read_response(sock)  # not one byte of the 500 MB was sent
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_a_chunked_upload_over_the_cap_is_cut_off_early(make_gateway):
    gateway = make_gateway(max_upload_mb=1)
    headers = gateway.admin_headers() | {
        "Content-Type": "multipart/form-data; boundary=xyz",
        "Transfer-Encoding": "chunked",
    }
    part_head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
    chunk = b"\0" * (64 * 1024)
    sent = 0
    with rawhttp.open_post(gateway.url, "/upload", headers) as sock:
        sock.sendall(b"%x\r\n%s\r\n" % (len(part_head), part_head))
        while sent < 50 * MIB:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        response = rawhttp.read_response(sock)
    assert response.status_code == 413
    assert sent < 10 * MIB, f"the gateway read {sent / MIB:.0f} MB before refusing"
    assert list(gateway.settings.uploads_dir.iterdir()) == []


@pytest.mark.parametrize(
    "declared",
    [
        "text/plain\nX-Evil: 1",
        "text/plain\x01",
        "text/plain\x7f",
        "",
        "not a type",
        "x" * 300,
        # Whitespace and letters to Python's \s and \w, but not to HTTP: such a type could never be sent back.
        "text/plain;\x1ccharset=utf-8",
        "text/plain;\x85charset=utf-8",
        "text/plain; charset=\u0101",
    ],
)
def test_a_declared_content_type_that_is_not_a_media_type_is_stored_generic(client, declared):
    response = upload(client, "odd.bin", b"data", declared)
    assert response.status_code == 201
    assert response.json()["content_type"] == "application/octet-stream"
    download = client.get(response.json()["download_path"])
    assert download.status_code == 200
    assert download.content == b"data"


def test_an_upload_stored_with_an_unsendable_type_by_an_older_version_still_downloads(client, gateway):
    stored = upload(client, "old.txt", b"old data").json()["filename"]
    execute(
        gateway.settings,
        "UPDATE uploads SET content_type = :type WHERE filename = :name",
        {"type": "text/plain;\x1cx=y", "name": stored},
    )
    download = client.get(f"/files/{stored}")
    assert download.status_code == 200
    assert download.content == b"old data"
    assert download.headers["content-type"] == "application/octet-stream"
