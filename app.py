"""Adapter Workbench: the web app. ``python app.py`` (or ``make run``) serves it on http://127.0.0.1:7860.

Environment:
    WORKBENCH_MODE                            local (default) | team | public (automatic on a Space)
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT   where to listen (local: 127.0.0.1, team/public: 0.0.0.0)
    WORKBENCH_HOME                            data directory (database, runs, model cache); on a Space
                                              /data/workbench when /data is writable
    WORKBENCH_USERS_FILE / WORKBENCH_USERS    team logins, ``name:<hash>`` (``python -m app.auth hash-password``)
    WORKBENCH_USER + WORKBENCH_PASSWORD       one login with a plain password (at least 10 characters)
    WORKBENCH_ADMINS                          team admins (and Hugging Face admins of a public Space)
    WORKBENCH_SECRET                          signs public visitors' tokens (else $WORKBENCH_HOME/secret.key)
    WORKBENCH_NO_WORKER=1                     do not run jobs in this process (a separate
                                              ``python -m jobs worker`` does)
    WORKBENCH_DEBUG=1                         show the traceback of a startup error

Wrong settings stop the server before it starts: one line on stderr, exit status 2.
``demo`` is built at import, so ``gradio app.py`` and Spaces find it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback


def _refuse_to_start(err: BaseException) -> None:
    if os.environ.get("WORKBENCH_DEBUG", "").strip() in ("1", "true", "yes"):
        traceback.print_exception(err)
    print(f"workbench: cannot start: {err}", file=sys.stderr)
    sys.exit(2)


from app.auth import space_home  # noqa: E402  (light: no Gradio, nothing reads WORKBENCH_HOME yet)

if space_home():  # on a Space, keep the data on the persistent disk when there is one
    os.environ["WORKBENCH_HOME"] = space_home()

from app.auth import startup_settings  # noqa: E402
from core.deployment import DeploymentError, configure  # noqa: E402

try:
    settings = startup_settings()
except DeploymentError as err:
    _refuse_to_start(err)
configure(settings.deployment)

from app.ui import build_demo, serve  # noqa: E402
from jobs.service import JobService  # noqa: E402

service = JobService(deployment=settings.deployment)
demo = build_demo(service, settings.deployment)


def _warm_up() -> None:
    """Convert the embedded model once (a few seconds) before the first chat or job needs it (the page's
    estimate reads its config from the GGUF header and never waits for this)."""
    try:
        from core.config import DEFAULT_MODEL
        from core.embedded import ensure_converted

        ensure_converted(DEFAULT_MODEL)
    except Exception:  # offline without the package: the UI says so when the model is chosen
        logging.getLogger("workbench").warning("embedded model not available", exc_info=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("workbench").info("mode: %s", settings.deployment.mode)
    if os.environ.get("WORKBENCH_NO_WORKER") != "1":
        from jobs.worker import start_worker_thread

        start_worker_thread(service)
    threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
    serve(demo, settings.deployment, settings.logins, block=True)


if __name__ == "__main__":
    main()
