"""Checking a person's password: signing in, and the check of the current password before a change.

Both are attempts under the sign-in limits (`auth.throttle`), reserved before the password is checked, so a
throttled guesser learns nothing more. Signing in takes the same work, and so the same time, whether or not
the email exists.
"""

from auth.passwords import PasswordHasher
from auth.throttle import SignInThrottle
from auth.users import User, UserStore
from core.errors import GatewayError, Unauthorized
from db.engine import Database


class PasswordCheck:
    def __init__(
        self, db: Database, users: UserStore, hasher: PasswordHasher, throttle: SignInThrottle
    ) -> None:
        self._db = db
        self._users = users
        self._hasher = hasher
        self._throttle = throttle

    async def sign_in(self, email: str, password: str, address: str) -> User:
        async with self._throttle.attempt(email, address) as attempt:
            stored = await self._db.run(self._users.find_by_email, email)
            if stored is None:
                await self._hasher.spend_verification_time(password)
                raise Unauthorized("wrong email or password")
            if not await self._hasher.verify(password, stored.password_hash):
                raise Unauthorized("wrong email or password")
            attempt.succeeded(stored.id)
        if stored.disabled:
            # Only someone who knows the password learns this, so it may be said plainly.
            raise Unauthorized("this account is disabled: ask an admin")
        return stored

    async def change_password(
        self, user: User, current_password: str, new_password: str, address: str
    ) -> User:
        """The user's own password change; every token issued before it stops working. The current password
        is checked like a login (same limits, same email): whoever holds a leaked API key must not be able to
        guess it, then change it."""
        async with self._throttle.attempt(user.email, address, kind="password change") as attempt:
            # By id: the same person, even if their email was given to someone else meanwhile.
            stored = await self._db.run(self._users.get, user.id)
            if stored is None:
                raise Unauthorized("invalid or expired token")
            if not await self._hasher.verify(current_password, stored.password_hash):
                raise GatewayError(403, "the current password is wrong")
            attempt.succeeded(user.id)
            new_hash = await self._hasher.hash(new_password)
        changed = await self._db.run(self._users.update, user.id, password_hash=new_hash)
        if changed is None:
            raise Unauthorized("invalid or expired token")
        return changed
