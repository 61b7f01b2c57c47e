"""Dataset loader of the offline tasks: a JSON file next to this module, no network.

The file holds ``{"SPLIT": [record, ...], ...}``; each split becomes a ``datasets.Dataset``.
The task YAML names it with ``custom_dataset: !function local_json.load`` and
``dataset_kwargs: {data_file: NAME.json}``; lm-eval calls ``load`` with the task's metadata
and its ``dataset_kwargs`` as keyword arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def load(data_file: str, **_: Any) -> datasets.DatasetDict:
    """The splits of ``data_file`` (a path relative to this directory, or absolute)."""
    path = Path(__file__).parent / data_file
    splits = json.loads(path.read_text(encoding="utf-8"))
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    )
