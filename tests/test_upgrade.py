"""A database made by the gateway before its storage moved to SQLAlchemy and Alembic upgrades in place on
the first start, losing nothing: people, their passwords and tokens, keys, upload records, sign-in history.

tests/data/gateway-before-alembic.sqlite3 was made by that code itself (its stores, not SQL written for the
test): an admin; a person removed again (id 2); Ada, with an allow-list, a changed password (token version 1)
and an API key; an upload of Ada's; two failed sign-ins then a success from 192.0.2.7 (a known address), and
a failed one for an unknown email. Her token and key below were issued then, with SECRET_KEY "s" * 48.
"""

import shutil
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from auth.api_keys import key_hash
from auth.passwords import hash_password
from db.engine import Database, database_url
from db.migrations import head_revision
from tests.databases import execute
from tests.servers import gateway_settings, start_gateway

MADE_BEFORE = Path(__file__).parent / "data" / "gateway-before-alembic.sqlite3"
SECRET_KEY = "s" * 48
ADA_KEY = "ogw_pKKTAhhB_Qio1GT-oIhCF-NjM6LuFh21waY_sLToztarhUI_y_H4"
ADA_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI5N2Y3NTJkYjFjMmVkOTVjMDQ4MGVmY2MwOGMyMjhlOCIsImlhdCI6MTc5"
    "NjE0OTQzMSwiZXhwIjoyMTExNTA5NDMxLCJ2ZXIiOjF9.e6GMSkN_GPUUPRE7_4GjZmpCG8ax2TawodSYj8lmSqs"
)
ADA_UPLOAD = "d358b35d214e4121a4ff683349f8ed44_old.txt"


def test_a_database_made_before_alembic_upgrades_in_place_losing_nothing(tmp_path, fake_ollama_server):
    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True)
    shutil.copy(MADE_BEFORE, data_dir / "gateway.sqlite3")
    (data_dir / "uploads" / ADA_UPLOAD).write_bytes(b"made before alembic")
    settings = gateway_settings(data_dir, fake_ollama_server.url, database_url=None, secret_key=SECRET_KEY)
    gateway, server = start_gateway(settings)
    try:
        attempts = execute(settings, "SELECT email, address, outcome FROM login_attempts ORDER BY id")
        assert attempts == [
            ("ada@example.com", "192.0.2.7", "forgiven"),
            ("ada@example.com", "192.0.2.7", "forgiven"),
            ("ada@example.com", "192.0.2.7", "succeeded"),
            ("nobody@example.com", "198.51.100.9", "failed"),
        ]
        assert execute(settings, "SELECT user_id, address FROM known_addresses") == [(3, "192.0.2.7")]
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADA_TOKEN}"}) as ada:
            me = ada.get("/me").json()  # a token issued before the upgrade: same identity, same version
            assert (me["id"], me["email"], me["models"]) == (3, "Ada@Example.com", ["llama3.2:1b"])
            assert [upload["filename"] for upload in ada.get("/files").json()] == [ADA_UPLOAD]
            assert ada.get(f"/files/{ADA_UPLOAD}").content == b"made before alembic"
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADA_KEY}"}) as script:
            assert script.get("/keys").json()[0]["name"] == "nightly job"
        signed_in = httpx.post(
            f"{gateway.url}/login", json={"email": "ada@example.com", "password": "adas-newer-password"}
        )
        assert signed_in.status_code == 200, "the email still compares without regard to case"
        admin_token = gateway.login("admin@example.com", "admins-old-password")
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {admin_token}"}) as admin:
            assert [user["id"] for user in admin.get("/admin/users").json()] == [1, 3]
            added = admin.post(
                "/admin/users", json={"email": "gus@example.com", "password": "guss-password-1"}
            )
            assert added.json()["id"] == 4, "neither the removed person's id (2) nor any other is given again"
    finally:
        server.stop()


@pytest.mark.storage
def test_the_schema_before_hosts_batch_keys_and_caps_upgrades_in_place(tmp_path, fake_ollama_server):
    """The last schema before stored hosts, key priorities and per-person caps (revision 0001), with a person
    and a key in it, on SQLite and on Postgres: its key keeps working, as an interactive one."""
    settings = gateway_settings(tmp_path / "data", fake_ollama_server.url, secret_key=SECRET_KEY)
    before = Database(database_url(settings.database_url, settings.data_dir))
    before.migrate("0001")
    with before.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO users (email, password_hash, role) VALUES ('ada@example.com', :hash, 'admin')"),
            {"hash": hash_password("adas-password-1")},
        )
        conn.execute(
            text("INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (1, 'nightly job', :p, :h)"),
            {"p": ADA_KEY[:12], "h": key_hash(ADA_KEY)},
        )
    before.close()
    gateway, server = start_gateway(settings)
    try:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADA_KEY}"}) as script:
            [key] = script.get("/keys").json()
            assert (key["name"], key["priority"]) == ("nightly job", "interactive")
            [ada] = [user for user in script.get("/admin/users").json() if user["email"] == "ada@example.com"]
            assert (ada["max_inflight"], ada["max_waiting"]) == (None, None)
            assert [host["id"] for host in script.get("/admin/hosts").json()] == ["env-1"]
            added = script.post("/admin/hosts", json={"name": "gpu-2", "url": "http://gpu-2.lan:11434"})
            assert added.json()["id"] == "h1"
        assert execute(settings, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    finally:
        server.stop()
