"""Uploaded files on disk, and their records (owner, size, type) in the database.

A file is written under a temporary name and renamed into place only once it is complete and recorded, so
a crash or an over-size upload never leaves half a file behind.
"""

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.body_limit import BodyTooLarge
from core.database import Database
from core.private_files import make_private_directory, open_new_private_file
from core.settings import MIB
from core.storage_errors import NotFound
from uploads.names import is_stored_name, new_stored_name

COPY_CHUNK = MIB
# type/subtype with optional parameters, in printable ASCII only (RFC 9110 tokens, spaces and tabs between
# them): the value is sent back as a header on download, where a control character or a non-Latin-1 letter
# (both of which Python's \s and \w accept) would make that download fail for good.
_TCHARS = r"[A-Za-z0-9!#$&^_.+-]+"
_MEDIA_TYPE = re.compile(rf"{_TCHARS}/{_TCHARS}(?:[ \t]*;[ \t]*{_TCHARS}={_TCHARS})*", re.ASCII)
DEFAULT_MEDIA_TYPE = "application/octet-stream"


def safe_media_type(declared: str | None) -> str:
    """The client's declared content type if it is a plain media type, else a generic one."""
    declared = (declared or "").strip(" \t")
    if declared and len(declared) <= 255 and _MEDIA_TYPE.fullmatch(declared):
        return declared
    return DEFAULT_MEDIA_TYPE


@dataclass(frozen=True)
class StoredUpload:
    filename: str
    owner_id: int
    original_name: str
    size: int
    content_type: str
    created_at: str = ""

    @property
    def download_path(self) -> str:
        return f"/files/{self.filename}"

    def public(self) -> dict:
        return {
            "filename": self.filename,
            "download_path": self.download_path,
            "original_name": self.original_name,
            "size": self.size,
            "content_type": self.content_type,
            "created_at": self.created_at,
        }


def _upload_from(row: sqlite3.Row) -> StoredUpload:
    return StoredUpload(
        filename=row["filename"],
        owner_id=row["owner_id"],
        original_name=row["original_name"],
        size=row["size"],
        content_type=row["content_type"],
        created_at=row["created_at"],
    )


class UploadStore:
    def __init__(self, directory: Path, db: Database, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._db = db

    def prepare(self) -> None:
        make_private_directory(self.directory)
        # Partial files from a crash mid-upload are never referenced by the database: clear them.
        for leftover in self.directory.glob(".partial-*"):
            leftover.unlink(missing_ok=True)

    def save(
        self, owner_id: int, source: BinaryIO, original_name: str | None, content_type: str | None
    ) -> StoredUpload:
        """Copy an upload into the store (blocking: run it in a worker thread). NotFound if the owner is
        gone."""
        filename = new_stored_name(original_name)
        partial = self.directory / f".partial-{filename}"
        try:
            size = self._copy_capped(source, partial)
            upload = StoredUpload(
                filename=filename,
                owner_id=owner_id,
                original_name=(original_name or "")[:255],
                size=size,
                content_type=safe_media_type(content_type),
            )
            final = self.directory / filename
            try:
                with self._db.transaction() as conn:
                    conn.execute(
                        "INSERT INTO uploads (filename, owner_id, original_name, size, content_type)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (upload.filename, owner_id, upload.original_name, size, upload.content_type),
                    )
                    os.replace(partial, final)
            except sqlite3.IntegrityError:
                # The owner was removed while the file was on the way: a record can't name a missing owner.
                final.unlink(missing_ok=True)
                raise NotFound("this account no longer exists") from None
            except BaseException:
                # The record did not commit (a full disk, say): the file it names must not stay either.
                final.unlink(missing_ok=True)
                raise
        finally:
            partial.unlink(missing_ok=True)
        return upload

    def _copy_capped(self, source: BinaryIO, target: Path) -> int:
        size = 0
        # Created 0600, never left to the umask: people's files are theirs (core.private_files).
        with os.fdopen(open_new_private_file(target), "wb") as out:
            while chunk := source.read(COPY_CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, "file", in_mib=True)
                out.write(chunk)
        return size

    def find(self, filename: str, owner_id: int) -> StoredUpload | None:
        """The upload of that name belonging to that user, if any (another user's is not found)."""
        if not is_stored_name(filename):
            return None
        row = self._db.fetch_one(
            "SELECT * FROM uploads WHERE filename = ? AND owner_id = ?", (filename, owner_id)
        )
        return _upload_from(row) if row else None

    def path_of(self, upload: StoredUpload) -> Path:
        return self.directory / upload.filename

    def of_owner(self, owner_id: int) -> list[StoredUpload]:
        rows = self._db.fetch_all(
            "SELECT * FROM uploads WHERE owner_id = ? ORDER BY created_at, filename", (owner_id,)
        )
        return [_upload_from(row) for row in rows]

    def delete(self, filename: str, owner_id: int) -> bool:
        """Remove one of the owner's uploads: its record, then its file (blocking)."""
        if not is_stored_name(filename):
            return False
        with self._db.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM uploads WHERE filename = ? AND owner_id = ?", (filename, owner_id)
            ).rowcount
        if deleted:
            self.remove_files([filename])
        return bool(deleted)

    def remove_files(self, filenames: list[str]) -> None:
        """Files whose records are gone (blocking)."""
        for filename in filenames:
            if is_stored_name(filename):
                (self.directory / filename).unlink(missing_ok=True)
