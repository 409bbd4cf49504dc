"""core.sources: every model name and data source is classified and checked in one place, per mode.

Built from ``Deployment.for_mode(...)`` directly (no environment). The remote-code proof at the end
uses a tiny LLaMA folder whose config.json points at its own ``configuration_evil.py``, which writes a
marker file when imported: in this (web-like) process the marker must never appear; in a job-like
subprocess that allows remote code it must.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import hub, sources
from core.config import DEFAULT_MODEL, ModelSettings
from core.fields import ConfigError
from core.deployment import Deployment
from core.sources import RemoteCodeError, SourceError, resolve_data, resolve_model

ROOT = Path(__file__).resolve().parents[1]
MODES = ("local", "team", "public")
ROWS = [{"instruction": f"What is {i} + 1?", "input": "", "output": f"The answer is {i + 1}.", "answer": str(i + 1)}
        for i in range(12)]


@pytest.fixture
def box(tmp_path, monkeypatch):
    """A data folder (the server's root) with a model and data files, a folder outside it, an upload."""
    monkeypatch.chdir(tmp_path)
    data, outside = tmp_path / "data", tmp_path / "outside"
    for folder in (data, outside, data / "model", outside / "model", data / "empty_model"):
        folder.mkdir(parents=True)
    for folder in (data / "model", outside / "model"):
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (data / "rows.json").write_text(json.dumps(ROWS))
    (data / "folder.json").mkdir()
    (data / "notes.txt").write_text("hello")
    (data / "weights.bin").write_text("not a folder")
    (outside / "secret.json").write_text(json.dumps(ROWS[:1]))
    (outside / "secret.txt").write_text("top secret")
    os.symlink(outside / "secret.json", data / "link.json")
    os.symlink(outside / "model", data / "linked_model")
    os.symlink(outside, data / "linked_dir")
    uploads = sources.default_uploads_dir()
    uploads.mkdir(parents=True, exist_ok=True)
    stored = uploads / "0123456789abcdef0123.json"
    stored.write_text(json.dumps(ROWS))
    Path(f"{stored}.name").write_text("my rows.json\n")
    return {"data": data, "outside": outside, "upload": stored, "tmp": tmp_path}


def dep(mode: str, box: dict, **values) -> Deployment:
    values.setdefault("data_dirs", (box["data"],))
    return Deployment.for_mode(mode, **values)


def refused(call, *args, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        call(*args, **kwargs)
    assert "Traceback" not in info.value.message and "\n" not in info.value.message
    return info.value


def generic(err: SourceError, name: str) -> None:
    """The one message of team and public mode for a source that is missing or not allowed."""
    assert err.message.startswith(f"{sources._shown(name)} is not found or not allowed here"), err.message


# --------------------------------------------------------------------------------------------------
# Models.

@pytest.mark.parametrize("mode", MODES)
def test_catalogue_model_resolves_in_every_mode(box, mode):
    found = resolve_model(DEFAULT_MODEL, dep(mode, box))
    assert (found.kind, found.location) == ("catalogue", DEFAULT_MODEL)


def test_local_model_folder_under_the_root(box):
    for d in (dep("local", box), dep("team", box), dep("local", box, data_dirs=())):
        found = resolve_model(str(box["data"] / "model"), d)
        assert found.kind == "local" and found.location == os.path.realpath(box["data"] / "model")
    err = refused(resolve_model, str(box["data"] / "model"), dep("public", box))
    generic(err, str(box["data"] / "model"))


@pytest.mark.parametrize("name, precise", [
    ("data/missing_model", "no model directory"),
    ("data/weights.bin", "is a file, not a checkpoint directory"),
    ("data/empty_model", "holds no config.json"),
    ("outside/model", "outside the data folders"),
    ("data/linked_model", "outside the data folders"),      # a symlink inside the root pointing out
    ("data/linked_dir/model", "outside the data folders"),  # through a linked folder
    ("data/../outside/model", "'..' is not allowed"),
    ("data/model/..", "'..' is not allowed"),
])
def test_bad_model_paths_precise_in_local_generic_elsewhere(box, name, precise):
    for given in ("./" + name, str(box["tmp"] / name)):  # ("data/missing_model" alone would be a hub id)
        err = refused(resolve_model, given, dep("local", box))
        assert precise in err.message and err.field == "model.name"
        assert str(box["outside"]) not in err.message.replace(given, "")  # never echo where a link leads
        for mode in ("team", "public"):
            generic(refused(resolve_model, given, dep(mode, box)), given)


def test_local_mode_without_data_dirs_reads_any_folder(box):
    open_local = dep("local", box, data_dirs=())
    assert resolve_model(str(box["outside"] / "model"), open_local).kind == "local"
    assert resolve_model("data/../outside/model", open_local).kind == "local"  # single user: as before
    err = refused(resolve_model, str(box["outside"] / "absent"), open_local)
    assert "no model directory" in err.message
    # team mode with no data folders reads no server path at all
    generic(refused(resolve_model, str(box["outside"] / "model"), dep("team", box, data_dirs=())),
            str(box["outside"] / "model"))


def test_model_hub_ids_and_the_public_allowlist(box):
    for mode in ("local", "team"):
        assert resolve_model("someone/some-model", dep(mode, box)).kind == "hub"
    public = dep("public", box, allowed_models=("someone/allowed",))
    assert resolve_model("someone/allowed", public).location == "someone/allowed"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", public).kind == "hub"  # the catalogue's own id
    generic(refused(resolve_model, "someone/other", public), "someone/other")


@pytest.mark.parametrize("name", ["/someone/model", "someone\\model", "someone/../model", "..", "~/model",
                                  ".hidden/model", "someone/model/extra", "someone/", "/", "a" * 300 + "/b",
                                  "someone/mo del", "someone/model\x00", "no-such-model-xyz"])
def test_ill_formed_hub_ids_are_refused(box, name):
    for mode in MODES:
        err = refused(resolve_model, name, dep(mode, box))
        assert err.field == "model.name"
        if mode != "local":
            assert "not found or not allowed here" in err.message
        assert len(err.message) < 800


def test_empty_model_name(box):
    for mode in MODES:
        assert "name a model" in refused(resolve_model, "  ", dep(mode, box)).message


def test_hub_id_that_is_a_local_folder_is_never_sent_to_the_hub(box):
    (box["tmp"] / "someone" / "folder").mkdir(parents=True)  # cwd is tmp: "someone/folder" exists
    (box["tmp"] / "someone" / "folder" / "config.json").write_text("{}")
    generic(refused(resolve_model, "someone/folder", dep("public", box, allowed_models=("someone/folder",))),
            "someone/folder")
    generic(refused(resolve_model, "someone/folder", dep("team", box)), "someone/folder")  # outside the root
    assert resolve_model("someone/folder", dep("local", box, data_dirs=())).kind == "local"  # it is a path
    for mode in MODES:
        d = dep(mode, box, allowed_datasets=("someone/folder",))
        refused(resolve_data, "someone/folder", d, kind="hub")
        with pytest.raises(SourceError):
            resolve_data("someone/folder", d)  # a folder is not a data file either
    with pytest.raises(ValueError):
        hub.read_hub_dataset("someone/folder")


def test_generic_message_is_the_same_for_missing_and_not_allowed(box):
    missing, forbidden = str(box["data"] / "nope"), str(box["outside"] / "model")
    for mode in ("team", "public"):
        a = refused(resolve_model, missing, dep(mode, box)).message.replace(missing, "<x>")
        b = refused(resolve_model, forbidden, dep(mode, box)).message.replace(forbidden, "<x>")
        assert a == b
        missing_f, forbidden_f = str(box["data"] / "nope.json"), str(box["outside"] / "secret.json")
        a = refused(resolve_data, missing_f, dep(mode, box)).message.replace(missing_f, "<x>")
        b = refused(resolve_data, forbidden_f, dep(mode, box)).message.replace(forbidden_f, "<x>")
        assert a == b
        if mode == "public":
            c = refused(resolve_data, "someone/not-allowed", dep(mode, box)).message
            assert c.replace("someone/not-allowed", "<x>") == a


# --------------------------------------------------------------------------------------------------
# Data sources.

@pytest.mark.parametrize("mode", MODES)
def test_builtin_and_uploads_are_allowed_in_every_mode(box, mode):
    d = dep(mode, box)
    found = resolve_data("builtin:math", d)
    assert found.kind == "builtin" and Path(found.location).is_file()
    up = resolve_data(str(box["upload"]), d)
    assert up.kind == "upload" and up.display_name == "my rows.json" and up.format == ".json"
    assert "builtin:nope" in refused(resolve_data, "builtin:nope", d).message  # names only: precise
    assert "name a dataset" in refused(resolve_data, "", d).message


def test_server_files_per_mode(box):
    rows = str(box["data"] / "rows.json")
    assert resolve_data(rows, dep("local", box)).kind == "local"
    assert resolve_data(rows, dep("team", box)).location == os.path.realpath(rows)
    assert resolve_data("data/rows.json", dep("team", box)).display_name == "rows.json"
    generic(refused(resolve_data, rows, dep("public", box)), rows)  # absolute path in public mode
    generic(refused(resolve_data, "data/rows.json", dep("public", box)), "data/rows.json")
    assert resolve_data(str(box["outside"] / "secret.json"), dep("local", box, data_dirs=())).kind == "local"


@pytest.mark.parametrize("name, precise", [
    ("data/nope.json", "no such file"),
    ("data/folder.json", "is a directory"),
    ("outside/secret.json", "outside the data folders"),
    ("data/link.json", "outside the data folders"),          # symlink inside the root pointing out
    ("data/linked_dir/secret.json", "outside the data folders"),
    ("data/../outside/secret.json", "'..' is not allowed"),
    ("data/./../data/rows.json", "'..' is not allowed"),
    ("/etc/passwd.json", "outside the data folders"),
    ("~/secret.json", "outside the data folders"),
])
def test_bad_data_paths_precise_in_local_generic_elsewhere(box, name, precise):
    err = refused(resolve_data, name, dep("local", box))
    assert precise in err.message and err.field == "data.source"
    for mode in ("team", "public"):
        generic(refused(resolve_data, name, dep(mode, box)), name)


def test_file_types_and_special_files(box):
    for mode in MODES:  # decided from the name alone, so precise everywhere
        assert "unsupported file type '.txt'" in refused(resolve_data, "data/notes.txt", dep(mode, box)).message
    assert "unsupported file type '.txt'" in refused(resolve_data, "outside/secret.txt",
                                                     dep("local", box, data_dirs=())).message
    if os.path.exists("/dev/zero"):
        err = refused(resolve_data, "/dev/zero", dep("local", box, data_dirs=()))
        assert "not a regular file" in err.message or "unsupported" in err.message
    assert "no such file" in refused(resolve_data, "nosuchname", dep("local", box, data_dirs=())).message


def test_hub_datasets_and_the_public_allowlist(box):
    for mode in ("local", "team"):
        assert resolve_data("someone/set", dep(mode, box)).kind == "hub"
    public = dep("public", box, allowed_datasets=("someone/allowed",))
    assert resolve_data("someone/allowed", public, kind="hub").location == "someone/allowed"
    generic(refused(resolve_data, "someone/other", public), "someone/other")
    for name in ("/abs/path", "a/../b", "../x", "someone\\set", "a" * 300 + "/b", "someone/set/more"):
        for mode in MODES:
            refused(resolve_data, name, dep(mode, box, allowed_datasets=(name,)), kind="hub")


def test_kind_restricts_what_a_field_accepts(box):
    d = dep("local", box)
    refused(resolve_data, "builtin:math", d, kind="hub")
    refused(resolve_data, "someone/set", d, kind="local")
    assert resolve_data(str(box["upload"]), d, kind="upload").kind == "upload"
    refused(resolve_data, "data/rows.json", d, kind="upload")


# --------------------------------------------------------------------------------------------------
# Data files (core.data through the same rules).

def _load(path, mode="local", box=None, **limits):
    from core import data

    d = Deployment.for_mode(mode, data_dirs=(box["data"],) if box else ())
    if limits:
        d = d.with_limits(**limits)
    return data.load_records(str(path), deployment=d)


@pytest.mark.parametrize("content, message", [
    (b"", "the dataset is empty"),
    (b"  \n\n", "the dataset is empty"),
    (b"\x00\x01\x02binary\x00", "binary file"),
    (b"\xff\xfe[\x00]\x00", "UTF-16"),
    (b'[{"instruction": "caf\xe9"}]', "not UTF-8"),
    (b"42", "expected a list of objects (got a JSON number)"),
    (b'"text"', "expected a list of objects (got a JSON string)"),
    (b"null", "expected a list of objects (got a JSON null)"),
    (b'[{"instruction": "Q", "output": "A"}, "text"]', "row 2 is not an object (got a JSON string)"),
    (b'[{"instruction": "Q", "output": "A"}, [1, 2]]', "row 2 is not an object (got a JSON array)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'[{"instruction": null, "output": "A"}]', "row 1 has no 'instruction': its value is null"),
    (b'[{"instruction": "Q", "output": null}]', "row 1 has no 'output': its value is null"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    from core.data import DataError

    with pytest.raises(DataError) as info:
        _load(path)
    assert message in info.value.message and "bad.json" in info.value.message


def test_jsonl_rows_that_are_not_objects(tmp_path):
    from core.data import DataError

    (tmp_path / "rows.jsonl").write_text('{"instruction": "Q", "output": "A"}\n[1]\n')
    with pytest.raises(DataError, match=r"rows\.jsonl: row 2 is not an object"):
        _load(tmp_path / "rows.jsonl")


def test_a_bom_is_accepted_in_json_and_jsonl(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in ROWS).encode())
    assert len(_load(tmp_path / "bom.json")) == len(_load(tmp_path / "bom.jsonl")) == 12


def test_column_mapping_names_a_missing_column_and_lists_the_file_columns(tmp_path):
    from core import data

    (tmp_path / "q.json").write_text(json.dumps([{"question": "Q", "solution": "A"}]))
    with pytest.raises(data.DataError) as info:
        data.load_records(str(tmp_path / "q.json"), {"instruction": "question", "output": "solutoin"})
    assert "'solutoin'" in info.value.message and "'question', 'solution'" in info.value.message
    with pytest.raises(data.DataError, match="'contxt'"):
        data.load_records(str(tmp_path / "q.json"), {"instruction": "question", "output": "solution",
                                                     "input": "contxt"})
    (tmp_path / "n.json").write_text(json.dumps([{"q": "Q", "s": "A"}, {"q": "Q2", "s": None}]))
    with pytest.raises(data.DataError, match=r"row 2 has no 'output' \(column 's'\): its value is null"):
        data.load_records(str(tmp_path / "n.json"), {"instruction": "q", "output": "s"})


def test_file_size_is_checked_before_reading(tmp_path, monkeypatch):
    from core import data

    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: 64 GiB on paper, nothing on disk; reading it would never end
        f.truncate(64 * 2**30)
    with pytest.raises(data.DataError, match="big.json is 65536.0 MB; one data file may be at most"):
        _load(big, "local")
    (tmp_path / "small.json").write_text(json.dumps(ROWS))
    with pytest.raises(data.DataError, match="at most 100 bytes"):
        _load(tmp_path / "small.json", upload_file_bytes=100)
    assert len(_load(tmp_path / "small.json", upload_file_bytes=100_000)) == 12


def test_dataset_rows_limit_truncates_with_a_note(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.csv").write_text("instruction,output\n" + "".join(f"Q{i},A{i}\n" for i in range(12)))
    for name in ("rows.json", "rows.csv"):
        records = _load(tmp_path / name, dataset_rows=5)
        assert len(records) == 5 and "only the first 5 rows" in records.notes[0] and name in records.notes[0]
        assert _load(tmp_path / name).notes == []


def test_upload_messages_use_the_users_file_name(box):
    from core import data

    bad = sources.default_uploads_dir() / "fedcba9876543210fedc.json"
    bad.write_text(json.dumps([{"instruction": "Q"}]))
    Path(f"{bad}.name").write_text("holiday/questions.json")
    with pytest.raises(data.DataError) as info:
        data.load_records(str(bad), deployment=dep("public", box))
    assert "questions.json: row 1 has no 'output'" in info.value.message and "fedcba" not in info.value.message
    with pytest.raises(data.DataError) as info:
        data.load_records(str(bad), deployment=dep("public", box), display_name="renamed.json")
    assert info.value.message.startswith("renamed.json: row 1")
    assert len(data.load_records(str(box["upload"]), deployment=dep("public", box))) == 12


def test_preview_of_a_server_path_is_refused_in_public_and_team(box):
    from core import data

    for mode in ("public", "team"):
        with pytest.raises(data.DataError) as info:
            data.load_records(str(box["outside"] / "secret.json"), deployment=dep(mode, box))
        assert "not found or not allowed here" in info.value.message


def test_benchmark_files_follow_the_same_rules(box):
    from core.benchmarks import BenchmarkError, load_benchmark

    (box["data"] / "my_set.json").write_text(json.dumps([{"instruction": "Q", "answer": "3"}]))
    assert len(load_benchmark(str(box["data"] / "my_set.json"), deployment=dep("team", box))) == 1
    for mode in ("team", "public"):
        with pytest.raises(BenchmarkError, match="not found or not allowed here"):
            load_benchmark(str(box["outside"] / "secret.json"), deployment=dep(mode, box))
    with pytest.raises(BenchmarkError, match="not found or not allowed here"):
        load_benchmark("someone/bench", deployment=dep("public", box))


def test_chat_tokens_are_clamped_to_the_deployment(box):
    from core.generate import GenerationSettings, new_tokens

    assert new_tokens(GenerationSettings(max_new_tokens=100_000), dep("public", box)) == 256
    assert new_tokens(GenerationSettings(max_new_tokens=64), dep("public", box)) == 64
    assert new_tokens(GenerationSettings(max_new_tokens=5000), dep("local", box)) == 4096


# --------------------------------------------------------------------------------------------------
# Remote code: never in this (web-like) process.

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("model code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def make_evil_model(folder: Path, tiny_model_dir: Path, marker: Path, where: str = "config.json") -> Path:
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_evil.py").write_text(EVIL.format(marker=str(marker)))
    path = folder / where
    cfg = json.loads(path.read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "configuration_evil.EvilForCausalLM"}
    path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def evil(box, tiny_model_dir):
    marker = box["tmp"] / "MARKER"
    return make_evil_model(box["data"] / "evil", tiny_model_dir, marker), marker


def _loaders():
    from core.estimate import estimate, model_config
    from core.models import load_config, load_model, load_tokenizer
    from core.config import AdapterConfig

    return {"model_config": lambda s, d: model_config(s, d), "tokenizer": lambda s, d: load_tokenizer(s, d),
            "load_model": lambda s, d: load_model(s, deployment=d), "load_config": lambda s, d: load_config(s, d),
            "estimate": lambda s, d: estimate(s, AdapterConfig(), deployment=d)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_never_runs_in_the_web_process(evil, box, mode, trust):
    folder, marker = evil
    settings = ModelSettings(name=str(folder), trust_remote_code=trust, device="cpu")
    d = dep(mode, box, allow_remote_code=True)
    assert not sources.remote_code_enabled(settings, d)
    for what, load in _loaders().items():
        with pytest.raises(ConfigError) as info:
            load(settings, d)
        if mode == "public":  # no server folders at all
            assert "not found or not allowed here" in info.value.message, what
        else:
            assert isinstance(info.value, RemoteCodeError), what
            assert "needs remote code; runs inside the job" in info.value.message, what
        assert not marker.exists(), what


def test_tokenizer_auto_map_counts_too(box, tiny_model_dir):
    marker = box["tmp"] / "MARKER2"
    folder = make_evil_model(box["data"] / "evil_tok", tiny_model_dir, marker, where="tokenizer_config.json")
    from core.models import load_tokenizer

    with pytest.raises(RemoteCodeError):
        load_tokenizer(ModelSettings(name=str(folder)), dep("team", box))
    assert not marker.exists()


def test_in_a_job_without_the_switches_the_error_names_the_missing_one(evil, box, monkeypatch):
    from core.estimate import model_config

    folder, marker = evil
    monkeypatch.setattr(sources, "_remote_code_here", True)  # as in the job child (undone after the test)
    cases = [(ModelSettings(name=str(folder), trust_remote_code=True), dep("team", box), "WORKBENCH_ALLOW_REMOTE_CODE=1"),
             (ModelSettings(name=str(folder)), dep("team", box, allow_remote_code=True), "trust remote code"),
             (ModelSettings(name=str(folder), trust_remote_code=True), dep("local", box), "WORKBENCH_ALLOW_REMOTE_CODE")]
    for settings, d, missing in cases:
        with pytest.raises(RemoteCodeError) as info:
            model_config(settings, d)
        assert "this job may not run it" in info.value.message and missing in info.value.message
    public = Deployment.for_mode("public", allow_remote_code=True)
    assert not sources.remote_code_enabled(ModelSettings(trust_remote_code=True), public)
    assert "never runs in public mode" in sources.remote_code_message("m", ModelSettings(trust_remote_code=True),
                                                                      public)
    with pytest.raises(RemoteCodeError, match="WORKBENCH_ALLOW_REMOTE_CODE"):  # at submit time
        sources.check_job_remote_code(resolve_model(str(folder), dep("team", box)),
                                      ModelSettings(name=str(folder), trust_remote_code=True), dep("team", box))
    assert not marker.exists()


def test_remote_code_runs_in_a_job_process_with_every_switch_on(box, tiny_model_dir):
    """The positive case, in a subprocess so that ``allow_remote_code_here`` cannot leak into other tests."""
    cases = {}
    for mode in ("local", "team"):
        marker = box["tmp"] / f"MARKER-{mode}"
        cases[mode] = (str(make_evil_model(box["data"] / f"evil_{mode}", tiny_model_dir, marker)), str(marker))
    script = textwrap.dedent(f"""
        import json, sys
        from core import sources
        from core.config import ModelSettings
        from core.deployment import Deployment
        from core.estimate import model_config
        from core.models import load_model

        sources.allow_remote_code_here()
        cases = json.loads({json.dumps(json.dumps(cases))})
        for mode, (folder, marker) in cases.items():
            d = Deployment.for_mode(mode, data_dirs=({str(box["data"])!r},), allow_remote_code=True)
            settings = ModelSettings(name=folder, trust_remote_code=True, device="cpu")
            cfg = model_config(settings, d)
            loaded = load_model(settings, deployment=d)
            print(mode, type(cfg).__name__, type(loaded.model).__name__)
    """)
    env = {**os.environ, "HF_HOME": str(box["tmp"] / "hf"), "HF_HUB_OFFLINE": "1",
           "WORKBENCH_HOME": str(box["tmp"] / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("WORKBENCH_MODE", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for mode, (_, marker) in cases.items():
        assert Path(marker).read_text() == "model code ran"
        assert f"{mode} EvilConfig EvilForCausalLM" in out.stdout
