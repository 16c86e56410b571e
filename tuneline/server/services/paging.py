"""What every paginated list shares: the answer to an `after` cursor that names nothing."""

from __future__ import annotations

from tuneline.server.errors import APIError, invalid_request
from tuneline.server.store import CursorNotFound


def stale_cursor(exc: CursorNotFound, what: str) -> APIError:
    return invalid_request(
        f"after={exc.cursor} does not name a {what} of this list (it may have been deleted): "
        "list again without `after`.",
        param="after",
        code="invalid_cursor",
    )
