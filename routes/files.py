"""POST /upload and GET /files/{filename}: files that belong to the user who uploaded them."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.errors import GatewayError, Unauthorized
from core.storage_errors import NotFound
from db.models import Upload
from routes.dependencies import AppServices, CurrentUser
from routes.schemas import UploadInfo, UploadResponse, errors
from uploads.store import safe_media_type

router = APIRouter(tags=["files"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            }
        },
    }
}

# Downloads are user content: never rendered by the browser, never sniffed into HTML or script.
_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


@router.post(
    "/upload",
    status_code=201,
    response_model=UploadResponse,
    responses=errors(400, 401, 413),
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a file (multipart field 'file')",
)
async def upload(request: Request, user: CurrentUser, services: AppServices) -> UploadResponse:
    # The form is parsed here, after authentication, not by FastAPI before it: an anonymous client must not
    # be able to make the gateway spool a large body to disk.
    async with request.form(max_files=1, max_fields=10) as form:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise GatewayError(400, "send the file as the multipart/form-data field 'file'")
        try:
            # In anyio's worker threads, not the database's (db.engine): copying a large file takes a while.
            stored = await run_in_threadpool(
                services.uploads.save, user.id, file.file, file.filename, file.content_type
            )
        except NotFound:
            # The account was removed while its file was on the way (its record can't name a missing
            # owner, and nothing was kept): its credentials no longer work.
            raise Unauthorized("this account no longer exists") from None
    return UploadResponse(
        filename=stored.filename,
        download_path=stored.download_path,
        size=stored.size,
        content_type=stored.content_type,
    )


@router.get(
    "/files/{filename}",
    response_class=FileResponse,
    responses={**errors(401, 404, 422), 200: {"description": "The file's bytes, as an attachment"}},
    summary="Download one of your uploads",
)
async def download(filename: str, user: CurrentUser, services: AppServices) -> FileResponse:
    stored = await services.db.run(services.uploads.find, filename, user.id)
    path = services.uploads.path_of(stored) if stored else None
    if stored is None or path is None or not path.is_file():
        raise GatewayError(404, "file not found")
    return FileResponse(
        path,
        # Checked again: an older version stored types that can't be sent back as a header.
        media_type=safe_media_type(stored.content_type),
        filename=stored.filename.split("_", 1)[1],
        content_disposition_type="attachment",
        headers=_DOWNLOAD_HEADERS,
    )


@router.get("/files", response_model=list[UploadInfo], responses=errors(401), summary="Your uploads")
async def list_uploads(user: CurrentUser, services: AppServices) -> list[Upload]:
    return await services.db.run(services.uploads.of_owner, user.id)


@router.delete(
    "/files/{filename}",
    status_code=204,
    responses=errors(401, 404, 422),
    summary="Delete one of your uploads",
)
async def delete_upload(filename: str, user: CurrentUser, services: AppServices) -> Response:
    if not await services.db.run(services.uploads.delete, filename, user.id):
        raise GatewayError(404, "file not found")
    return Response(status_code=204)
