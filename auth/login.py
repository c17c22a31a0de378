"""Signing in with an email and password (blocking: run it in a worker thread).

Throttled first, then checked with the same work, and so the same time, whether or not the email exists.
"""

from auth.passwords import spend_verification_time, verify_password
from auth.throttle import LoginThrottle
from auth.users import User, UserStore
from core.errors import GatewayError, Unauthorized


def sign_in(users: UserStore, throttle: LoginThrottle, email: str, password: str, address: str) -> User:
    wait = throttle.retry_after(email, address)
    if wait is not None:
        raise GatewayError(429, "too many failed logins: try again later", {"Retry-After": str(wait)})
    stored = users.find_by_email(email)
    if stored is None:
        spend_verification_time(password)
    elif verify_password(password, stored.password_hash):
        if stored.user.disabled:
            # Only someone who knows the password learns this, so it may be said plainly.
            raise Unauthorized("this account is disabled: ask an admin")
        throttle.forget_failures(email)
        return stored.user
    throttle.record_failure(email, address)
    raise Unauthorized("wrong email or password")


def change_password(users: UserStore, user: User, current_password: str, new_password: str) -> User:
    """The user's own password change; every token issued before it stops working."""
    stored = users.find_by_email(user.email)
    if stored is None or not verify_password(current_password, stored.password_hash):
        raise GatewayError(403, "the current password is wrong")
    changed = users.update(user.id, password=new_password)
    if changed is None:
        raise Unauthorized("invalid or expired token")
    return changed
