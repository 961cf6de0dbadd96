"""Log formats: uvicorn's plain text, or one JSON object per line for log shippers."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
import uvicorn.logging

_TEXT_FORMAT = "%(levelname)s:     %(message)s"

# Libraries that log what they send at DEBUG, token keys among it (aiosqlite logs every
# statement with its parameters): they stay at INFO whatever --log-level says.
_VERBOSE_LIBRARIES = ("aiosqlite",)


def escape_char(char: str) -> str:
    """One character as a Python-style escape: \\xHH, \\uHHHH or \\UHHHHHHHH."""
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(text: str) -> str:
    """`text` with its non-printable characters (line breaks among them) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else escape_char(char) for char in text)


class OneLineFormatter(logging.Formatter):
    """A text format in which each message is one line, whatever it quotes (a path, a header).

    A traceback still follows on lines of its own, after the message.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.message.isprintable():
            record = copy.copy(record)
            record.message = one_line(record.message)
        return super().formatMessage(record)


class TextFormatter(OneLineFormatter, uvicorn.logging.DefaultFormatter):
    """uvicorn's text format (its level prefix, its colours on a terminal), one line a message."""


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
    handler.setFormatter(JSONFormatter() if log_format == "json" else OneLineFormatter(_TEXT_FORMAT))
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
    else:
        config["formatters"]["default"]["()"] = "usage_service.logs.TextFormatter"
    return config
