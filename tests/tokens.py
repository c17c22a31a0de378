"""Hand-made JWTs for the attack matrix: none of these go through the gateway's own signer."""

import base64
import json
import time

from jose import jwt


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user_id: int = 1, *, lifetime: int = 3600, version: int = 0, **extra) -> dict:
    now = int(time.time())
    return {"sub": str(user_id), "iat": now, "exp": now + lifetime, "ver": version, **extra}


def signed(payload: dict, key: str, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def unsigned(payload: dict) -> str:
    """alg "none": a token that claims to need no signature."""
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."


def with_payload_swapped(token: str, payload: dict) -> str:
    """Keep header and signature, replace the payload: what a tamperer does."""
    header, _, signature = token.split(".")
    return f"{header}.{_b64(payload)}.{signature}"
