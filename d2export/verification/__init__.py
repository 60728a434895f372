"""``verify``: weights, outputs and (optionally) a task, judged against measured floors."""

from ..options import Thresholds, VerifyOptions
from .report import VerifyReport
from .runner import verify

__all__ = ["Thresholds", "VerifyOptions", "VerifyReport", "verify"]
