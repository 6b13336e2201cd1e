"""What the SQL stores (SQLite and PostgreSQL) share: schema version checks and stored entries.

Each database records the version of its schema. A store migrates an older database forward, in
steps, in one transaction, and refuses a newer one: that database belongs to a newer vouchd, and
an older one must not write to it.
"""

from __future__ import annotations

import json

from vouchd.authority.store import StoreError
from vouchd.entries import Entry, InvalidEntryError

__all__ = ["entry_from_wire", "entry_to_wire", "schema_version_found"]


def schema_version_found(where: str, found: str | None, *, latest: int) -> int:
    """The schema version a database has (0: none yet, a new database); StoreError when this vouchd
    cannot migrate it: a newer version, or a value that is no version at all."""
    if found is None:
        return 0
    try:
        version = int(found)
    except ValueError:
        version = -1
    if version > latest:
        raise StoreError(f"{where}: schema version {version} is newer than this vouchd knows ({latest}): "
                         f"it was written by a newer vouchd; run that version, or restore a backup made "
                         f"with this one")
    if version < 1:
        raise StoreError(f"{where}: schema version {found[:20]!r} is not one this vouchd reads (1 to {latest})")
    return version


def entry_to_wire(entry: Entry) -> str:
    """The stored form of an entry: Entry.to_wire() as JSON, keys sorted (the whole truth)."""
    return json.dumps(entry.to_wire(), sort_keys=True)


def entry_from_wire(where: str, entry_id: str, wire: str) -> Entry:
    try:
        return Entry.from_wire(json.loads(wire))
    except (ValueError, InvalidEntryError) as err:
        raise StoreError(f"{where}: entry {entry_id} is stored damaged: {err}") from None
