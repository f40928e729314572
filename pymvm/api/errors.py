"""Errors of the control API: each maps to one HTTP status and a JSON {"error": "..."} body."""

from __future__ import annotations


class ApiError(Exception):
    """A request the VMM refuses; ``status`` is the HTTP status its answer carries."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message}


class BadRequest(ApiError):
    """Malformed JSON, a missing or unknown field, a value outside its enum."""

    status = 400


class NotFound(ApiError):
    """An unknown path or device id."""

    status = 404


class MethodNotAllowed(ApiError):
    status = 405


class Conflict(ApiError):
    """The VM's state does not allow the action (pause while stopping, ...)."""

    status = 409


class ApiSocketError(Exception):
    """The API socket cannot be served (another VMM answers there, bad directory)."""
