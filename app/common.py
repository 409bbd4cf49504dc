"""What every tab shares: error messages (never tracebacks), formatting helpers, the page's CSS."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
import logging
import time
from typing import Any, Callable

import gradio as gr

from core.fields import ConfigError

log = logging.getLogger("workbench.ui")

CSS = """
.block.error-box { border: 1px solid #fca5a5 !important; background: #fef2f2 !important; border-radius: 8px; padding: 4px 12px !important; }
.error-box p, .error-box li { color: #991b1b !important; }
.block.estimate-box { border: 1px solid #e2e8f0; background: #f8fafc; border-radius: 8px; padding: 4px 12px !important; }
.muted p { color: #64748b !important; font-size: 13px; }
.section-title h3 { margin: 6px 0 2px 0 !important; }
.log-box textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace !important; font-size: 12px !important; }
footer { display: none !important; }
"""


def error_text(err: BaseException) -> str:
    """A one-paragraph Markdown message for ``err``: the field at fault first where there is one."""
    if isinstance(err, ConfigError):
        return f"**{err.field}**: {err.message}"
    message = str(err).strip() or type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return f"{message}"
    if isinstance(err, (ValueError, KeyError, LookupError, RuntimeError)):
        return f"{message}"
    return f"{type(err).__name__}: {message}"


def error_update(message: str | None) -> dict:
    """The error box: shown with ``message``, hidden when there is none."""
    return gr.update(value=message or "", visible=bool(message))


def warn(message: str) -> None:
    """A toast in the browser (a Python warning outside a Gradio event)."""
    gr.Warning(message.replace("**", ""))


def guarded(n_outputs: int, error_index: int | None = None) -> Callable:
    """Wrap a handler so that an unexpected exception becomes a message, never a traceback.

    The wrapped function returns ``gr.skip()`` for every output except ``error_index`` (if given),
    which receives the error box update; a toast is shown too.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # the UI must keep working whatever went wrong
                log.exception("handler %s failed", fn.__name__)
                text = error_text(err)
                warn(text)
                outs = [gr.skip() for _ in range(n_outputs)]
                if error_index is not None:
                    outs[error_index] = error_update(text)
                return outs[0] if n_outputs == 1 else tuple(outs)
        return inner
    return wrap


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def fmt_float(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def download_file(text: str, filename: str) -> dict:
    """Write ``text`` to a fresh temporary folder as ``filename`` and show it in a File component."""
    path = Path(tempfile.mkdtemp(prefix="workbench-export-")) / filename
    path.write_text(text)
    return gr.update(value=str(path), visible=True)
