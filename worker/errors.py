"""Per-image failures caused by what the client sent; they become in-place errors, never crashes."""

from __future__ import annotations

from shared.errors import ErrorCode
from shared.protocol import ItemError


class ImageInputError(Exception):
    """An image that cannot be used: the message says why, the code names the kind of failure."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_item_error(self) -> ItemError:
        return ItemError(message=self.message, code=self.code)
