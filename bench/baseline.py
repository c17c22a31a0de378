"""An earlier version of the gateway, unpacked beside this one, so one run can measure before and after.

A before/after taken from two runs compares two states of a shared machine as much as two versions of the
code; measured in the same run, alternating, both versions see the same noise.
"""

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.procs import REPO_ROOT


def short_name(revision: str) -> str:
    """The commit's short hash, which names the earlier version in the results."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", f"{revision}^{{commit}}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"--baseline {revision}: not a commit of this repository")
    return done.stdout.strip()


@contextlib.contextmanager
def unpacked(revision: str) -> Iterator[Path]:
    """The files of `revision` in a temporary folder (git archive: no worktree left registered)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    try:
        archive = subprocess.Popen(["git", "archive", revision], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(folder)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {revision} failed")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
