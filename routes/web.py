"""The built-in chat page, served at GET / from the gateway's own origin (no CORS needed).

`GET /` answers the page itself and `HEAD /` answers 200 for the heartbeat Ollama's clients send: never a
redirect, since Ollama's clients follow redirects and an API client sent to a login page would break. The page
and its static files are public (there is nothing secret in them); everything they call needs a token.

The Content-Security-Policy allows scripts only from this origin's files: even if model output got past the
Markdown sanitiser, an injected `<script>` or `onerror=` attribute could not run.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_DIR = WEB_DIR / "static"
PAGE_TYPE = "text/html; charset=utf-8"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["web"])


@router.get("/", response_class=FileResponse, summary="The chat page (no token needed)")
async def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type=PAGE_TYPE, headers=PAGE_HEADERS)


@router.get("/favicon.ico", response_class=FileResponse, summary="The gateway's icon (no token needed)")
async def favicon() -> FileResponse:
    # Browsers ask for it on every origin they visit; a 401 or 404 there is noise in every log.
    return FileResponse(
        STATIC_DIR / "favicon.ico", media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"}
    )


@router.head("/", response_class=FileResponse, summary="Heartbeat of Ollama's clients (no token needed)")
async def heartbeat() -> Response:
    return Response(status_code=200, media_type=PAGE_TYPE, headers=PAGE_HEADERS)
