"""The one exception type that user-facing code raises for bad input.

Every error a user can cause (a missing checkpoint, an unreadable slide, a malformed
filter) is a `ConchdbError` whose message names the file or field and whose `hint`
says how to fix it. The CLI prints both and exits with `exit_code`; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConchdbError(Exception):
    """A problem with the user's input or environment, with the fix attached."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class CheckpointError(ConchdbError):
    """The CONCH weights are missing, unreadable or do not fit the architecture."""


class TokenizerError(ConchdbError):
    """The CONCH tokenizer file is missing or not the expected one."""


class ImageInputError(ConchdbError):
    """A file given as an image is missing or is not a readable image."""


class SlideError(ConchdbError):
    """A slide cannot be opened, read, or has no usable pixel size."""


class StoreError(ConchdbError):
    """The vector store refused an operation (locked, wrong model, bad collection)."""


class QueryError(ConchdbError):
    """A search query or filter expression is malformed."""
