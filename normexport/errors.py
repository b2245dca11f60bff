"""The exceptions a user can cause: a message and a hint. The CLI maps each to its ``exit_code``."""

from __future__ import annotations


class NormexportError(Exception):
    """A problem with the user's input or options: one line of message, one line of hint (exit 2)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ValidationFailed(NormexportError):
    """Validation ran and the result did not match its reference (exit 1). Carries the report."""

    exit_code = 1

    def __init__(self, message: str, report=None, hint: str | None = None):
        super().__init__(message, hint)
        self.report = report


def first_line(e: BaseException | str, limit: int = 300) -> str:
    """The first non-blank line of an exception's text (or of ``e`` itself), with the next one
    where it ends in ':' (an introduction), at most ``limit`` characters; an exception with no
    text gives its type's name, an empty string gives ""."""
    text = e if isinstance(e, str) else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "" if isinstance(e, str) else type(e).__name__
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return first[:limit]
