"""GET and HEAD /: a public sign of life, for the heartbeat Ollama's clients send (`HEAD /`).

Never a redirect: Ollama's clients follow redirects, and an API client sent to a login page would break.
"""

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

router = APIRouter(tags=["health"])


SIGN_OF_LIFE = "ollama-gateway is running"


@router.get("/", response_class=PlainTextResponse, summary="Sign of life (no token needed)")
async def root() -> str:
    return SIGN_OF_LIFE


@router.head("/", response_class=PlainTextResponse, summary="Heartbeat of Ollama's clients (no token needed)")
async def heartbeat() -> str:
    return SIGN_OF_LIFE
