"""DATA_DIR is private to the gateway's user: folders 0700, files 0600, whatever the umask (issue 9, item 7).

It holds the password and API-key hashes, the JWT signing key and people's uploaded files. Under the usual
umask 022 anything created without an explicit mode is readable by every account on the machine (0644,
0755), so every file and folder the gateway writes there is created with its mode, and a folder an older
version left readable is tightened at start.
"""

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("gateway.files")

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600
_GROUP_AND_OTHERS = 0o077


def make_private_directory(path: Path) -> None:
    """Create the folder (and any missing parents, with the default mode: they are the operator's) and
    make it 0700, also if it existed already."""
    path.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIRECTORY)


def create_private_file(path: Path) -> None:
    """Create the file empty with mode 0600 if it does not exist; an existing file is left as it is."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))


def open_new_private_file(path: Path) -> int:
    """A descriptor on a new file, mode 0600, open for writing; FileExistsError if it exists."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)


def make_tree_private(root: Path) -> None:
    """Make the folder `root` (created if missing) and everything under it private (blocking).

    What older versions wrote (0644 files, 0755 folders) becomes 0600 and 0700: every permission of group
    and others is taken off, the owner's own are kept. Symbolic links are not followed. A file the gateway's
    user does not own can't be changed: that is logged, not fatal, since the operator put it there."""
    make_private_directory(root)
    for folder, folders, files in os.walk(root):
        for name in [*folders, *files]:
            _take_away_group_and_others(Path(folder) / name)


def _take_away_group_and_others(path: Path) -> None:
    try:
        status = path.lstat()
        if stat.S_ISLNK(status.st_mode) or not status.st_mode & _GROUP_AND_OTHERS:
            return
        os.chmod(path, stat.S_IMODE(status.st_mode) & ~_GROUP_AND_OTHERS)
    except FileNotFoundError:
        return  # removed meanwhile (a partial upload, SQLite's -shm)
    except OSError as exc:
        logger.warning("could not make %s private to this user: %s", path, exc)
