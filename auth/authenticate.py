"""From an Authorization header to a user: the one place that decides who is calling.

Used by the `CurrentUser` dependency and by the relay fast path alike. A token is accepted as
`Authorization: Bearer <token>` (what the OpenAI SDKs send as their api_key), or as the password of HTTP Basic
(for clients that can only put credentials in a URL, `http://anything:<token>@gateway`).
"""

import base64
import binascii

from auth.tokens import InvalidToken, TokenSigner
from auth.users import User, UserStore
from core.errors import Unauthorized

EXPECTED = "expected 'Authorization: Bearer <token>' (or HTTP Basic with the token as password)"


def token_from_header(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized(EXPECTED) from None
        _, colon, password = decoded.partition(":")
        if colon and password:
            return password
    raise Unauthorized(EXPECTED)


def authenticate(authorization: str | None, signer: TokenSigner, users: UserStore) -> User:
    token = token_from_header(authorization)
    try:
        claims = signer.verify(token)
    except InvalidToken:
        raise Unauthorized("invalid or expired token") from None
    user = users.get(claims.user_id)
    if user is None:
        raise Unauthorized("invalid or expired token")
    return user
