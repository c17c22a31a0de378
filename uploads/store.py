"""Uploaded files on disk, and their records (owner, size, type) in the database.

A file is written under a temporary name and renamed into place only once it is complete and recorded, so
a crash or an over-size upload never leaves half a file behind.
"""

import os
import re
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from core.body_limit import BodyTooLarge
from core.private_files import make_private_directory, open_new_private_file
from core.settings import MIB
from core.storage_errors import NotFound
from db.engine import Database, affected
from db.models import Upload
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
    ) -> Upload:
        """Copy an upload into the store (blocking: run it in a worker thread). NotFound if the owner is
        gone."""
        filename = new_stored_name(original_name)
        partial = self.directory / f".partial-{filename}"
        try:
            size = self._copy_capped(source, partial)
            upload = Upload(
                filename=filename,
                owner_id=owner_id,
                original_name=(original_name or "")[:255],
                size=size,
                content_type=safe_media_type(content_type),
            )
            final = self.directory / filename
            try:
                with self._db.transaction() as session:
                    session.add(upload)
                    session.flush()
                    os.replace(partial, final)
            except IntegrityError:
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

    def find(self, filename: str, owner_id: int) -> Upload | None:
        """The upload of that name belonging to that user, if any (another user's is not found)."""
        if not is_stored_name(filename):
            return None
        with self._db.session() as session:
            upload = session.get(Upload, filename)
        return upload if upload is not None and upload.owner_id == owner_id else None

    def path_of(self, upload: Upload) -> Path:
        return self.directory / upload.filename

    def of_owner(self, owner_id: int) -> list[Upload]:
        query = select(Upload).where(Upload.owner_id == owner_id).order_by(Upload.created_at, Upload.filename)
        with self._db.session() as session:
            return list(session.scalars(query))

    def delete(self, filename: str, owner_id: int) -> bool:
        """Remove one of the owner's uploads: its record, then its file (blocking)."""
        if not is_stored_name(filename):
            return False
        statement = delete(Upload).where(Upload.filename == filename, Upload.owner_id == owner_id)
        with self._db.transaction() as session:
            deleted = affected(session.execute(statement))
        if deleted:
            self.remove_files([filename])
        return bool(deleted)

    def remove_files(self, filenames: list[str]) -> None:
        """Files whose records are gone (blocking)."""
        for filename in filenames:
            if is_stored_name(filename):
                (self.directory / filename).unlink(missing_ok=True)
