"""Adapter Workbench: the web app. ``python app.py`` (or ``make run``) serves it on http://127.0.0.1:7860.

Environment:
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT   where to listen (the Hugging Face Spaces convention)
    WORKBENCH_HOME                            data directory (database, runs, model cache)
    WORKBENCH_USER + WORKBENCH_PASSWORD       turn on a login page
    WORKBENCH_NO_WORKER=1                     do not run jobs in this process (a separate
                                              ``python -m jobs worker`` does)

``demo`` is built at import, so ``gradio app.py`` and Spaces find it.
"""

from __future__ import annotations

import logging
import os
import threading

from app.ui import build_demo, launch_options
from jobs.service import JobService

service = JobService()
demo = build_demo(service)


def _warm_up() -> None:
    """Convert the embedded model once (a few seconds) before the first click needs it."""
    try:
        from core.config import DEFAULT_MODEL, ModelSettings
        from core.estimate import model_config

        model_config(ModelSettings(name=DEFAULT_MODEL))
    except Exception:  # offline without the package: the UI says so when the model is chosen
        logging.getLogger("workbench").warning("embedded model not available", exc_info=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get("WORKBENCH_NO_WORKER") != "1":
        from jobs.worker import start_worker_thread

        start_worker_thread(service)
    threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
    demo.launch(**launch_options())


if __name__ == "__main__":
    main()
