"""The library's logger: structlog on top of the standard ``logging`` logger "ascend".

ascend never configures logging for the application. Its events go to the stdlib
logger named ``ascend``, so they follow the application's logging setup (by default
only warnings and errors are shown).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

_stdlib = logging.getLogger("ascend")


def _render(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """``what happened (key=value, ...)``: a sentence a person reads, then its details."""
    message = str(event.pop("event", ""))
    details = ", ".join(f"{key}={value!r}" for key, value in event.items())
    return f"{message} ({details})" if details else message


logger: Any = structlog.wrap_logger(
    _stdlib,
    wrapper_class=structlog.stdlib.BoundLogger,
    processors=[
        structlog.stdlib.filter_by_level,
        structlog.processors.format_exc_info,
        _render,
    ],
)
