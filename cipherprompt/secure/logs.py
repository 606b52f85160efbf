"""Log formats for the server: plain text lines or JSON lines.

Structured records carry their fields in ``extra={"fields": {...}}`` and show the same fields
as ``key=value`` pairs in their message, so a plain text log contains them too. The JSON format
adds the fields as keys of the line's object. No record ever contains a prompt, a token id or an
output: the server never has them.
"""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ",".join(f"{key}:{item}" for key, item in value.items()) or "-"
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def format_fields(fields: dict) -> str:
    """``key=value`` pairs; values with spaces are quoted, dicts become ``key:count,...``."""
    return " ".join(f"{key}={_format_value(value)}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_formatter(json_lines: bool) -> None:
    """Give every handler of the root logger the JSON formatter, or the text one."""
    formatter = (JsonFormatter() if json_lines
                 else logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
