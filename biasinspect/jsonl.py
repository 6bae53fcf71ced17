"""``--format jsonl``: one JSON object per line, written as each file's result arrives.

A public contract, like the JSON report (keys are only ever added):

* ``{"type": "model", ...}`` per model, with exactly the keys of an entry of ``models`` in the JSON
  report;
* ``{"type": "error", "path": str, "message": str}`` per path that could not be inspected;
* one last line ``{"type": "summary", "tool": "biasinspect", "version": str, "models": int,
  "errors": int}``, so a reader can tell a finished stream from a cut one.
"""

from __future__ import annotations

import json
from typing import Any

from biasinspect import __version__
from biasinspect.model import InspectionFailure, ModelReport
from biasinspect.render import model_to_json


def model_record(model: ModelReport) -> dict[str, Any]:
    """A model line's object: ``type`` then the keys of a JSON report's ``models`` entry."""
    return {"type": "model", **model_to_json(model)}


def error_record(failure: InspectionFailure) -> dict[str, Any]:
    """A failure line's object."""
    return {"type": "error", "path": failure.path, "message": failure.message}


def summary_record(models: int, errors: int) -> dict[str, Any]:
    """The last line's object: how many model and error lines came before it."""
    return {
        "type": "summary",
        "tool": "biasinspect",
        "version": __version__,
        "models": models,
        "errors": errors,
    }


def line(record: dict[str, Any]) -> str:
    """One record as one line of text (newline included); control characters are escaped by JSON."""
    return json.dumps(record) + "\n"


__all__ = ["error_record", "line", "model_record", "summary_record"]
