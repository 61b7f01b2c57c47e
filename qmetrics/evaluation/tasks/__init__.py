"""Task definitions shipped with qmetrics for lm-evaluation-harness.

``offline/`` holds lm-eval task YAMLs whose data are local JSON files (no network):
``qmetrics_mc`` (multiple choice) and ``qmetrics_rolling`` (rolling log-likelihood). Its
README says how to use them as templates for your own tasks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

OFFLINE_TASKS = ("qmetrics_mc", "qmetrics_rolling")


def offline_task_dir() -> Path:
    """The directory of the offline tasks (pass it to lm-eval as an include path)."""
    return Path(str(resources.files("qmetrics.evaluation.tasks") / "offline"))
