"""The one error type users see: what went wrong and how to fix it.

The CLI prints `EdgedistillError` as a short message (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgedistillError(Exception):
    """A problem with the user's input or environment, with the fix in `hint`."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if hint is None else f"{problem}\n  fix: {hint}")
