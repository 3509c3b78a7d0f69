"""The library's logger: structlog on top of the standard ``logging`` logger "ascend".

ascend never configures logging for the application. Its events go to the stdlib
logger named ``ascend``, so they follow the application's logging setup (by default
only warnings and errors are shown).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_stdlib = logging.getLogger("ascend")

logger: Any = structlog.wrap_logger(
    _stdlib,
    wrapper_class=structlog.stdlib.BoundLogger,
    processors=[
        structlog.stdlib.filter_by_level,
        structlog.processors.format_exc_info,
        structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
    ],
)
