"""Checking an email and password: the same work, and so the same time, whether or not the email exists."""

from auth.passwords import spend_verification_time, verify_password
from auth.users import User, UserStore


def authenticate(users: UserStore, email: str, password: str) -> User | None:
    stored = users.find_by_email(email.strip())
    if stored is None:
        spend_verification_time(password)
        return None
    if not verify_password(password, stored.password_hash):
        return None
    return stored.user
