"""The API docs, GET /docs (Swagger UI) and GET /redoc (ReDoc), with everything they load served from here.

FastAPI's own docs pages load their scripts from a CDN: blank pages on a network without internet, and a
third party's script on the origin where the chat page keeps its token. These pages load the copies vendored
in web/static/vendor, and their Content-Security-Policy names no other origin. Like the chat page they are
public; every call "Try it out" makes needs a token.
"""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from routes.web import PAGE_TYPE, WEB_DIR


def _headers(*extra: str) -> dict[str, str]:
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",  # the OpenAPI document, /login from Authorize, and "Try it out"
            *extra,
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        )
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


SWAGGER_HEADERS = _headers("style-src 'self'")
# ReDoc writes its styles into <style> elements as it renders (styled-components) and runs its search in a
# worker it builds from a blob: URL.
REDOC_HEADERS = _headers("style-src 'self' 'unsafe-inline'", "worker-src blob:")

router = APIRouter(tags=["docs"], include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    return FileResponse(WEB_DIR / "docs.html", media_type=PAGE_TYPE, headers=SWAGGER_HEADERS)


@router.get("/redoc")
async def redoc() -> FileResponse:
    return FileResponse(WEB_DIR / "redoc.html", media_type=PAGE_TYPE, headers=REDOC_HEADERS)
