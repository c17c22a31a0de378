"""The README's examples, run exactly as written against a fresh gateway, as a newcomer would: `python
main.py` in an empty folder with the test Ollama, and the first-start password read off its console.

One shell runs, in the README's order, every `sh` block that talks to the gateway (`$G`) or runs `manage.py`
(from the gateway's folder, as the README says), and the Python
client examples whose packages the tests install (ollama, openai); LangChain's and the JavaScript ones are
not run, nor the `bash` blocks, which need a setup of their own (several Ollama hosts). The only edits are
the two a reader makes: the printed password, and the gateway's address (here a
free port instead of 8000). When the README drifts from the gateway, this test fails.
"""

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import REPO, clean_environment, running_main

README = REPO / "README.md"
ADDRESS = "http://127.0.0.1:8000"
ADDRESS_LINE = f"G={ADDRESS}"
PASSWORD_LINE = "PASSWORD='the password printed on first start'"
RUN_TIMEOUT = 120
# As the README runs it, from the gateway's folder; here the test's interpreter and the repository's script.
MANAGE = ".venv/bin/python manage.py"
BASH = shutil.which("bash") or "/bin/bash"


@dataclass(frozen=True)
class Example:
    language: str
    code: str


def readme_examples() -> list[Example]:
    fenced = re.finditer(
        r"^```(\w*)\n(.*?)^```$", README.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL
    )
    examples = [Example(match[1], match[2]) for match in fenced]
    return [
        example
        for example in examples
        if (example.language == "sh" and ("$G" in example.code or MANAGE in example.code))
        or (example.language == "python" and re.search(r"^from (ollama|openai) import", example.code, re.M))
    ]


def as_shell(examples: list[Example], url: str, password: str) -> str:
    lines = ["set -euo pipefail"]
    for example in examples:
        if example.language == "sh":
            lines.append(
                example.code.replace(ADDRESS_LINE, f"G={url}")
                .replace(PASSWORD_LINE, f"PASSWORD='{password}'")
                .replace(MANAGE, f"{sys.executable} {REPO / 'manage.py'}")
            )
        else:
            # The test's own interpreter: it has the clients the examples import.
            lines += [f"{sys.executable} - <<'PYTHON'", example.code.replace(ADDRESS, url), "PYTHON"]
    return "\n".join(lines) + "\n"


def printed_password(console: Path) -> str:
    found = re.search(r"^\s*password: (\S+)$", console.read_text(), re.MULTILINE)
    assert found, console.read_text()
    return found[1]


def test_the_readme_has_the_examples_this_test_runs():
    examples = readme_examples()
    code = "\n".join(example.code for example in examples)
    # Exactly one place to edit, and one address to change for another port.
    assert code.count(PASSWORD_LINE) == 1
    assert code.count(ADDRESS_LINE) == 1
    assert {example.language for example in examples} == {"sh", "python"}


def test_every_curl_in_the_examples_fails_on_an_error_status():
    """Without it, an error answer (a wrong password, a model not allowed) passes for a result, and `-o file`
    would write the error over the reader's file."""
    for example in readme_examples():
        if example.language != "sh":
            continue
        code = re.sub(r"(^|\s)#.*$", "", example.code, flags=re.MULTILINE)
        for options in re.findall(r"\bcurl\s+(\S+)", code):
            assert options == "--fail-with-body", example.code


@pytest.fixture
def fresh_gateway(tmp_path, ollama):
    with running_main(tmp_path, OLLAMA_URL=ollama.url) as (url, console, _):
        yield url, printed_password(console)


def test_the_readme_examples_run_as_written_against_a_fresh_gateway(fresh_gateway, tmp_path, ollama):
    url, password = fresh_gateway
    script = as_shell(readme_examples(), url, password)
    result = subprocess.run(
        [BASH, "-c", script],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert '"status":"success"' in out  # the pull
    assert '"done":true' in out  # the streamed chat's last line
    assert "Notes from the first hour" in out  # the upload, downloaded by the name it was given
    assert '"ollama_reachable":true' in out
    assert f'"version":"{ollama.version}"' in out
    assert '"key":"ogw_' in result.stderr  # the API key, shown once
    # manage.py, from the gateway's folder: the key it created is the one it revoked, and the reset worked.
    assert "created key 2 'backup job'" in out
    assert "revoked key 2" in out
    assert "reset the password of admin@local" in out
    # What the examples asked of Ollama, in order: nothing went elsewhere, and the chats ran the model.
    chats = [request for request in ollama.requests if request.path in ("/api/chat", "/v1/chat/completions")]
    assert len(chats) >= 5
    assert {request.model for request in chats} == {"llama3.2:1b"}
    # Nothing was written in the reader's folder.
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith("console-")) == [
        "data"
    ]
