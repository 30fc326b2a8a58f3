"""Static HTML pages of a run: the gallery (OUT/report/index.html) and the eval page (OUT/eval.html)."""

from .eval_page import write_eval_page
from .gallery import write_report
from .run_files import ReportError

__all__ = ["ReportError", "write_eval_page", "write_report"]
