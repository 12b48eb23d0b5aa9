"""Checks on output folders, made before any work so a run never fails half-way for want of a folder."""
import os
import shutil

from utils.errors import UserError

MIN_FREE_BYTES = 200 * 1024 ** 2


def check_writable_folder(folder, flag, min_free_bytes=MIN_FREE_BYTES):
    """Raise a UserError unless `folder` exists and is writable, or could be created, with some free space.

    Nothing is created: the nearest existing parent is checked instead.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'{flag} {folder}: {existing} is a file, not a folder; choose another {flag}', exit_code=1)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {folder}: no permission to write in {existing}; choose another {flag}', exit_code=1)
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise UserError(f'{flag} {folder}: only {free // 1024 ** 2} MiB free on that disk; free some space or '
                        f'choose another {flag}', exit_code=1)
