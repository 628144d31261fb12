"""The one error type users see: what went wrong and how to fix it.

The CLI prints `EdgedistillError` as a short message (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class EdgedistillError(Exception):
    """A problem with the user's input or environment, with the fix in `hint`."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if hint is None else f"{problem}\n  fix: {hint}")


# errnos that mean "no room" rather than a bug: full disk, quota, file size limit
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how the writers below the Python layer report the same failure without an errno: torch's zip
# writer (its C++ stream gives no reason), safetensors' Rust writer (the OS error as text)
NO_ROOM_MESSAGES = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed", "iostream error",
                    "No space left on device", "Disk quota exceeded", "File too large",
                    *(f"os error {code}" for code in NO_ROOM_ERRNOS))


def no_room(exc: BaseException) -> str | None:
    """Why a write failed for lack of room, whichever layer raised it (an OSError, numpy's short
    write, torch's serializer, safetensors), or None when `exc` is some other failure. The chain
    of causes is searched, since torch raises its own error while handling the stream's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and not isinstance(current, EdgedistillError):
        seen.add(id(current))
        text = str(current)
        if isinstance(current, OSError) and current.errno in NO_ROOM_ERRNOS:
            return current.strerror or text
        if isinstance(current, OSError) and current.errno is None and "requested and" in text and "written" in text:
            return f"short write ({text})"  # numpy's tofile
        if isinstance(current, (RuntimeError, OSError)) or type(current).__name__ == "SafetensorError":
            if any(message in text for message in NO_ROOM_MESSAGES):
                return text.splitlines()[0][:200]
        current = current.__cause__ or current.__context__
    return None


def no_room_error(path: object, exc: BaseException, resume: str) -> EdgedistillError:
    """The one message for a write that found no room; `resume` says what the rerun keeps."""
    return EdgedistillError(f"no room to write {path}: the disk is full, a quota or a file size limit was reached "
                            f"({no_room(exc)})", f"free some space and run the same command again; {resume}")
