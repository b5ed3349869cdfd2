"""An add's undo steps, run when it fails or is cancelled, that never hide why it failed."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


class Rollback(contextlib.AsyncExitStack):
    """The undo steps of an add: on an error they run, newest first, and the error is raised.

    A failing undo step never replaces that error (nor a `CancelledError`): it is logged and
    added to the error's notes. Only a cancellation during the undo of an ordinary error
    propagates instead, chained to it. On success the caller calls `pop_all()`.
    """

    async def __aexit__(self, *exc_details: Any) -> bool:
        error = exc_details[1]
        try:
            return bool(await super().__aexit__(*exc_details))
        except BaseException as failed:
            if error is None or failed is error:
                raise
            if isinstance(error, Exception) and not isinstance(failed, Exception):
                raise
            failures: list[BaseException] = []
            link: BaseException | None = failed
            while link is not None and link is not error and link not in failures:
                failures.append(link)
                link = link.__context__
            for f in reversed(failures):
                log.warning("undoing after %r failed too", error, exc_info=f)
                error.add_note(f"undoing it failed too: {type(f).__name__}: {f}")
            return False
