"""From an Authorization header to a user: the one place that decides who is calling.

Used by the `CurrentUser` dependency and by the relay fast path alike.
"""

from auth.tokens import InvalidToken, TokenSigner
from auth.users import User, UserStore
from core.errors import Unauthorized


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("expected an 'Authorization: Bearer <token>' header")
    return token


def authenticate(authorization: str | None, signer: TokenSigner, users: UserStore) -> User:
    token = bearer_token(authorization)
    try:
        claims = signer.verify(token)
    except InvalidToken:
        raise Unauthorized("invalid or expired token") from None
    user = users.get(claims.user_id)
    if user is None:
        raise Unauthorized("invalid or expired token")
    return user
