"""Log formats: uvicorn's plain text, or one JSON object per line for log shippers."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn

_TEXT_FORMAT = "%(levelname)s:     %(message)s"

# Libraries that log what they send at DEBUG, token keys among it (aiosqlite logs every
# statement with its parameters): they stay at INFO whatever --log-level says.
_VERBOSE_LIBRARIES = ("aiosqlite",)


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, then the message or the record's fields.

    A record logged with a mapping as its only argument (the access log) has its fields written
    as JSON members rather than folded into the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.args, Mapping):
            entry.update(record.args)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, log_format: str) -> None:
    """Set up logging for the command itself, before uvicorn takes over."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in _VERBOSE_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


def uvicorn_config(level: str, log_format: str) -> dict[str, Any]:
    """uvicorn's logging configuration, with our loggers, in the chosen format (applied in every worker)."""
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["usage_service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    # Access lines go to stdout, like uvicorn's own (which is off: it would log query strings).
    config["handlers"]["usage_access"] = {**config["handlers"]["default"], "stream": "ext://sys.stdout"}
    # Asked for explicitly (--access-log), so not silenced by --log-level warning.
    config["loggers"]["usage_service.access"] = {
        "handlers": ["usage_access"],
        "level": "INFO",
        "propagate": False,
    }
    for name in _VERBOSE_LIBRARIES:
        config["loggers"][name] = {"level": "INFO" if level.upper() == "DEBUG" else level.upper()}
    if log_format == "json":
        for name in config["formatters"]:
            config["formatters"][name] = {"()": "usage_service.logs.JSONFormatter"}
    return config
