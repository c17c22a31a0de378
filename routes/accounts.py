"""Operations on a whole account, across the stores that hold its parts."""

from auth.users import UserStore
from uploads.store import UploadStore


def delete_account(users: UserStore, uploads: UploadStore, user_id: int) -> bool:
    """Remove a user, their API keys and their uploads (blocking). False if there was no such user."""
    filenames = [upload.filename for upload in uploads.of_owner(user_id)]
    if not users.delete(user_id):  # the keys' and uploads' records go with it (ON DELETE CASCADE)
        return False
    uploads.remove_files(filenames)
    return True
