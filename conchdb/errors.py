"""The exceptions that user-facing code raises for bad input, shaped for any front end.

Every error a user can cause (a missing checkpoint, an unreadable slide, a malformed
filter) is a `ConchdbError` with three parts that a front end arranges its own way:
`message` says what is wrong, `fix` says how to put it right in words that fit any
front end (no command-line flags: an HTTP client has none), and `parameter` names the
library argument it is about (`top_k`, `where`, `image`, `slide_mpp`, ...), which the CLI
shows as its flag and an HTTP API as its JSON field. The CLI prints the error and exits
with `exit_code`; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConchdbError(Exception):
    """A problem with the user's input or environment, with the fix attached."""

    exit_code: int = 2

    def __init__(
        self,
        message: str,
        fix: str | None = None,
        *,
        parameter: str | None = None,
        exit_code: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.parameter = parameter
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


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


class ManifestError(ConchdbError):
    """The manifest cannot be used: the message names the file, line and column."""
