"""What a job spec may ask for on this workbench: the checks ``submit`` runs before anything is written.

``check_spec`` parses a spec strictly (``core.config``), then applies this deployment's rules for this
actor: which models and data sources may be used (``core.sources`` allowlists and data roots, uploads
only their owner's), whether a model's own code may run, the per-job limits, and that the first rows of
a data file are valid. ``resolve_model`` and ``resolve_data`` are the same rules for a single name.
Part of the service API (``JobService`` inherits these methods), so the UI, the CLI and the HTTP API
all pass through them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .access import ServiceBase
from .schema import KINDS

CHECK_ROWS = 50  # rows of a data file read at submit to catch a wrong file or column mapping early


class SpecChecksAPI(ServiceBase):
    """Mixin of ``JobService``: needs ``uploads_dir`` and ``upload_name`` (``UploadsAPI``)."""

    def check_spec(self, spec: Any, kind: str = "train") -> Any:
        """Parse and validate a spec (``JobSpec``, dict or JSON text); return the ``JobSpec``.

        Raises ``core.config.ConfigError`` naming the field at fault. Beyond ``JobSpec.validate()``:
        a data file must exist, and the model must be a catalogue name, an existing checkpoint
        directory or a plausible hub id. Local paths are made absolute (the child runs elsewhere).
        """
        from core.config import JobSpec
        from core.fields import ConfigError
        from core.trackers import check_report_to

        if kind not in KINDS:
            raise ConfigError("kind", f"unknown job kind {kind!r}; use {', '.join(KINDS)}")
        if isinstance(spec, str):
            spec = JobSpec.from_json(spec)
        elif isinstance(spec, dict):
            spec = JobSpec.from_dict(spec)
        elif not isinstance(spec, JobSpec):
            raise ConfigError("spec", f"expected a JobSpec, a dict or JSON text, not {type(spec).__name__}")
        else:
            spec = JobSpec.from_dict(spec.to_dict())  # a private copy
        spec.validate()
        self._check_remote_code(spec)
        check_report_to(spec, kind, self.deployment, self.actor.admin)  # public: the server's trackers only
        self._check_model(spec)
        if kind == "train":
            self._check_data(spec)
            self._check_size(spec)
        elif kind == "evaluate" and not spec.eval.benchmarks:
            raise ConfigError("eval.benchmarks", "name at least one benchmark to evaluate")
        self._check_benchmarks(spec)
        return spec

    def _check_remote_code(self, spec: Any) -> None:
        """A model's own Python code runs only in a job child, only where the server allows it, and in
        team mode only for admins; never in public mode."""
        from core.fields import ConfigError

        if not spec.model.trust_remote_code:
            return
        d = self.deployment
        if d.public:
            raise ConfigError("model.trust_remote_code", "a model's own code never runs on this public workbench")
        if not d.allow_remote_code:
            raise ConfigError("model.trust_remote_code", "this workbench does not run a model's own code "
                                                         "(the server sets WORKBENCH_ALLOW_REMOTE_CODE=1 to allow it)")
        if d.mode == "team" and not self.actor.admin:
            raise ConfigError("model.trust_remote_code", "only an admin may run a model's own code on this workbench")

    def _check_size(self, spec: Any) -> None:
        """The deployment's per-job limits (admins are not limited)."""
        from core.fields import ConfigError

        if self.actor.admin:
            return
        lim, t = self.limits, spec.train
        if t.max_steps > lim.max_steps:
            raise ConfigError("train.max_steps", f"this workbench allows at most {lim.max_steps:,} steps per job")
        if t.max_steps == 0 and t.epochs > lim.max_epochs:
            raise ConfigError("train.epochs", f"this workbench allows at most {lim.max_epochs:g} epochs per job "
                                              f"(or set train.max_steps <= {lim.max_steps:,})")

    def _check_benchmarks(self, spec: Any) -> None:
        """Every benchmark named exists (a registry name or a data file the sources rules allow), and the
        deployment's example limit holds."""
        from core.fields import ConfigError
        from core.benchmarks import benchmark_info

        for i, name in enumerate(spec.eval.benchmarks):
            if benchmark_info(name) is not None:
                continue
            try:
                self._resolve_file(name, f"eval.benchmarks[{i}]")
            except ConfigError as err:
                if str(name).startswith("builtin:"):  # said from the name alone: e.g. the allowed operations
                    raise ConfigError("eval.benchmarks", err.message) from None
                raise ConfigError("eval.benchmarks", f"unknown benchmark {str(name)[:80]!r}: name one of the "
                                                     "registry's benchmarks or a JSON/JSONL/CSV file") from None
        refusal = loglikelihood_refusal(spec.eval.benchmarks) if spec.eval.protocol == "loglikelihood" else None
        if refusal:
            raise ConfigError("eval.protocol", refusal)
        cap = self.limits.eval_examples
        if cap and spec.eval.benchmarks and not self.actor.admin and not 0 < spec.eval.limit <= cap:
            raise ConfigError("eval.limit", f"this workbench evaluates at most {cap:,} examples per benchmark: "
                                            f"set eval.limit between 1 and {cap:,}")

    def _check_model(self, spec: Any) -> None:
        """The model is one this deployment may load (``core.sources``); a local folder is recorded by
        its real path (the child runs elsewhere), and its layer count bounds ``adapter.layers``."""
        from core.sources import check_job_remote_code, resolve_model

        source = resolve_model(_as_text(spec.model.name, "model.name"), self.deployment)
        check_job_remote_code(source, spec.model, self.deployment)  # the job could run it: else say which switch
        spec.model.name = source.location
        layers = _config_layers(spec.model.name)
        if layers is not None:
            from core.config import parse_layers
            from core.fields import ConfigError

            try:
                parse_layers(spec.adapter.layers, layers)
            except ConfigError as err:
                raise err.within("adapter") from None

    def _check_data(self, spec: Any) -> None:
        """The data source is one this actor may read, and its first rows are valid training rows."""
        from core.fields import ConfigError
        from core.data import check_template, load_records

        spec.data.source = self.resolve_data(spec.data.source)
        if spec.data.source.startswith("builtin:") or Path(spec.data.source).suffix == "":
            return  # built-in (checked in the repository's tests) or a hub dataset (read by the job)
        try:
            records = load_records(spec.data.source, spec.data.columns, limit=CHECK_ROWS,
                                   deployment=self.deployment, uploads_dir=self.uploads_dir)
        except ConfigError as err:
            raise ConfigError("data.source", err.message) from None
        check_template(records, spec.data.template)  # conversations need template chat

    def resolve_model(self, name: Any, field: str = "model.name") -> str:
        """What a model name stands for under this deployment's rules: a catalogue name, a hub id, or a
        checkpoint folder's real path. ``ConfigError`` on ``field`` otherwise (in public and team mode
        one message for missing and not allowed)."""
        from core.sources import resolve_model

        source = resolve_model(_as_text(name, field), self.deployment, field=field)
        return source.location

    def resolve_data(self, source: Any, field: str = "data.source", kind: str | None = None) -> str:
        """What a data source stands for under this deployment's rules, for this actor: ``builtin:*``, a hub
        id, or a file's real path; an upload only if it is the actor's own. ``kind`` restricts it to one
        kind (the UI's hub-id field passes ``"hub"``, so a local path typed there is refused)."""
        from core.sources import resolve_data

        found = resolve_data(_as_text(source, field), self.deployment, field=field, uploads_dir=self.uploads_dir,
                             kind=kind)
        if found.kind == "upload" and not self.actor.admin and self.upload_name(found.location) is None:
            from core.sources import SourceError

            raise SourceError(field, f"{found.display_name!r} is not found or not allowed here: upload it again")
        return found.name if found.kind in ("builtin", "hub") else found.location

    def _resolve_file(self, name: Any, field: str) -> str:
        """A benchmark given as a data file or hub id (not a registry name)."""
        return self.resolve_data(name, field=field)


def loglikelihood_refusal(benchmarks: list[str]) -> str | None:
    """Why ``loglikelihood`` cannot score these benchmarks (some have number answers, no options), or None.
    Registry names and ``builtin:`` sets are known by name; a data file's rows are checked by its job."""
    from core.benchmarks import benchmark_info
    from core.choices import has_choices

    numeric = []
    for name in benchmarks:
        info = benchmark_info(name)
        answer_type = info.answer_type if info is not None else "number" if str(name).startswith("builtin:") else None
        if answer_type is not None and not has_choices(answer_type):
            numeric.append(name)
    if not numeric:
        return None
    one = len(numeric) == 1
    return (f"loglikelihood scores the options of multiple-choice questions, and {', '.join(numeric)} "
            f"{'has' if one else 'have'} none (number answers): evaluate {'it' if one else 'them'} with generate")


def _as_text(value: Any, field: str) -> str:
    from core.fields import ConfigError

    if not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        raise ConfigError(field, f"expected a name or path (got {str(value)[:40]!r})")
    return value


def _config_layers(model: str) -> int | None:
    """The decoder depth a checkpoint folder's ``config.json`` states (None when not a readable folder)."""
    path = Path(model) / "config.json"
    try:
        if path.stat().st_size > 4 * 2**20:
            return None
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
