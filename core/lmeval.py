"""Our models in EleutherAI's lm-evaluation-harness: an lm-eval ``LM`` class, and its command line.

``WorkbenchLM`` wraps a loaded model (a base model, with a job's adapter or a merge loaded or not)
and answers lm-eval's three request types with our own engine:

- ``loglikelihood``: ``core.loglik.loglikelihood`` (lm-eval's contract; a question's choices share their
  context's forward pass);
- ``loglikelihood_rolling``: the text cut into lm-eval's disjoint rolling windows
  (``lm_eval.utils.get_rolling_token_windows``), each window one forward pass, windows batched;
- ``generate_until``: ``core.decoding.batched_greedy`` with each request's ``until`` strings, EOS and
  ``max_gen_toks`` as its stop rule; the text is cut at the first ``until`` string, as lm-eval's HF
  model does. Greedy only: a task asking for sampling is refused.

lm-eval's own CLI cannot load a model class from another package (their issues #1457, #1621), so
``python -m core.lmeval`` loads ours and hands every other argument to lm-eval's CLI::

    python -m core.lmeval --job 7 --tasks arc_easy --limit 200          # a job's adapter (or merge)
    python -m core.lmeval --adapter runs/7/adapter --tasks my_task.yaml  # an adapter folder
    python -m core.lmeval --base smollm2-135m --tasks hellaswag --num_fewshot 5

It registers the class as ``workbench`` and runs ``lm-eval run --model workbench --model_args {...}``
with the rest of the arguments (``--output_path``, ``--log_samples``, ``--limit``, ``--device``,
``--batch_size``...). The
background job kind (``jobs.lmeval_jobs``) uses ``core.lmeval_tasks`` instead, which stores the results.

Public API: ``MODEL_NAME``, ``WorkbenchLM``, ``load_workbench_model``, ``register``, ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .decoding import batched_greedy, eos_ids, model_device
from .loglik import iter_loglikelihood
from .paths import cli_error

MODEL_NAME = "workbench"  # the name lm-eval knows our class by (``--model workbench``)
DEFAULT_MAX_LENGTH = 2048
_TAIL_TOKENS = 48  # tokens decoded from the end of a row to look for its until strings


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _batch_size(value: Any) -> int:
    """lm-eval hands ``--batch_size`` over as text; we take a positive whole number only ('auto' searches
    for the largest size that fits, which our batched passes do not need)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size: expected a positive whole number, got {text[:20]!r}")
    return int(text)


def load_workbench_model(adapter: str | Path | None = None, base: str | None = None,
                         precision: str | None = None, device: str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, reduced dtype or None) loaded as the evaluate job loads them: the base model
    of ``adapter`` (the spec saved with it; a merge's base model) with the adapter loaded, or the base
    model ``base`` alone; ``precision``/``device`` override the saved ones. Names are checked by
    ``core.sources`` (``core.models.load_model``)."""
    from .config import JobSpec, ModelSettings
    from .devices import resolve_device, resolve_dtype
    from .inject import load_adapter, read_adapter_config
    from .models import load_model

    if (adapter is None) == (base is None):
        raise ValueError("give exactly one of adapter (an adapter folder) and base (a base model name)")
    if adapter is not None:
        meta = read_adapter_config(adapter)
        training = meta.get("training") or {}
        settings = (JobSpec.from_dict(training["spec"]).model if "spec" in training
                    else ModelSettings(name=meta.get("base_model") or ModelSettings().name))
    else:
        settings = ModelSettings(name=str(base))
    if precision:
        settings.precision = precision
    if device:
        settings.device = device
    dtype = resolve_dtype(settings.precision, resolve_device(settings.device))
    reduced = None if dtype == torch.float32 else dtype  # frozen weights and autocast, as in training
    loaded = load_model(settings, dtype=reduced)
    if adapter is not None:
        load_adapter(loaded.model, adapter, tokenizer=loaded.tokenizer)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, reduced


class WorkbenchLM(LM):
    """A loaded model as an lm-eval ``LM`` (see the module docstring).

    Built either from a loaded ``model`` and ``tokenizer`` (the job runner, tests) or, as lm-eval's CLI
    builds models from ``--model_args``, from ``adapter=DIR`` or ``base=NAME`` (with ``precision``,
    ``device``). ``dtype``: bf16/fp16 runs the model under autocast. ``add_bos_token``: as lm-eval's HF
    model (off by default). ``on_batch(done, total)`` is called after each batch of requests; it may
    raise to stop the run (the job's cancel). ``max_batch_size`` is accepted because lm-eval's CLI
    passes it to every model; it bounds ``batch_size='auto'``, which this class does not take.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, adapter: str | None = None,
                 base: str | None = None, precision: str | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, batch_size: Any = 8, max_batch_size: Any = None,
                 add_bos_token: bool = False, max_gen_toks: int = 256, max_length: int | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        super().__init__()
        if model is None:
            model, tokenizer, dtype = load_workbench_model(adapter, base, precision, device)
        elif tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.batch_size = _batch_size(8 if batch_size is None else batch_size)
        self.add_bos_token = bool(add_bos_token)
        self.max_gen_toks = int(max_gen_toks)
        config = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None)
                              or getattr(config, "n_positions", None) or DEFAULT_MAX_LENGTH)
        self.on_batch = on_batch
        self._device = model_device(model)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(v, int)), 0)
        self.prefix_id = next((v for v in (tokenizer.bos_token_id, tokenizer.eos_token_id) if isinstance(v, int)), None)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from .templates import render_chat

        return render_chat(chat_history, self.tokenizer, add_generation_prompt=add_generation_prompt)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with torch.inference_mode(), _autocast(self._device, self.dtype):
            yield

    def _report(self, done: int, total: int) -> None:
        if self.on_batch is not None:
            self.on_batch(done, total)

    # ------------------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        done = 0
        self._report(0, len(pairs))
        with _autocast(self._device, self.dtype):
            for batch in iter_loglikelihood(self.model, self.tokenizer, pairs, self.batch_size,
                                            add_special_tokens=self.add_bos_token):
                for index, logp, greedy in batch:
                    results[index] = (logp, greedy)
                    self.cache_hook.add_partial("loglikelihood", pairs[index], (logp, greedy))
                done += len(batch)
                self._report(done, len(pairs))
        return results  # type: ignore[return-value]  # every request is in some batch

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's summed log-probability, every token predicted once, after BOS (else EOS), in
        windows of at most ``max_length`` tokens (lm-eval's rolling windows)."""
        if self.prefix_id is None:
            raise ValueError("loglikelihood_rolling needs a BOS or EOS token to start each text; "
                             "the tokenizer has neither")
        windows: list[tuple[int, list[int], list[int]]] = []  # (request, context, continuation)
        for i, r in enumerate(requests):
            tokens = list(self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"])
            for ctx, cont in map(make_disjoint_window,
                                 get_rolling_token_windows(tokens, self.prefix_id, self.max_length, 1)):
                windows.append((i, list(ctx), list(cont)))
        totals = [0.0] * len(requests)
        self._report(0, len(windows))
        with self._running():
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size]
                for (i, _, _), logp in zip(batch, self._score_windows([(c, t) for _, c, t in batch])):
                    totals[i] += logp
                self._report(min(start + self.batch_size, len(windows)), len(windows))
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), total)
        return totals

    def _score_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-probability of each window's continuation after its context: one right-padded pass."""
        seqs = [ctx + cont[:-1] for ctx, cont in windows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits.float()
        logp = logits.log_softmax(-1)
        out = []
        for row, (ctx, cont) in enumerate(windows):
            first = len(ctx) - 1  # the position whose logits predict the continuation's first token
            target = torch.tensor(cont, device=logp.device)
            out.append(float(logp[row, first:first + len(cont)].gather(-1, target.unsqueeze(-1)).sum()))
        return out

    # ----------------------------------------------------------------------------- generate_until
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        rules, prompts = [], []
        for n, r in enumerate(requests):
            context, kwargs = r.args
            until, limit = self._generation_rule(dict(kwargs or {}), n)
            ids = list(self.tokenizer(context, add_special_tokens=self.add_bos_token)["input_ids"])
            if not ids and self.prefix_id is not None:  # an empty context: start from BOS (else EOS), as lm-eval
                ids = [self.prefix_id]
            keep = max(1, self.max_length - limit)
            prompts.append(ids[-keep:])  # lm-eval keeps the end of a long context
            rules.append((until, limit, max(_TAIL_TOKENS, max((len(u) for u in until), default=0))))

        def stop(i: int, tokens: list[int]) -> str | None:
            until, limit, window = rules[i]
            if tokens and tokens[-1] in self.eos:
                return "eos"
            if until:
                tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
                if any(u in tail for u in until):
                    return "until"
            return "length" if len(tokens) >= limit else None

        done = 0

        def on_done(i: int, tokens: list[int], reason: str) -> None:
            nonlocal done
            done += 1
            if done % self.batch_size == 0 or done == len(prompts):
                self._report(done, len(prompts))

        self._report(0, len(prompts))
        with self._running():
            generated, _ = batched_greedy(self.model, self.tokenizer, prompts, self.batch_size, stop, self.pad_id,
                                          on_done)
        texts = []
        for i, r in enumerate(requests):
            tokens = generated[i][0]
            if tokens and tokens[-1] in self.eos:
                tokens = tokens[:-1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for u in rules[i][0]:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", tuple(r.args), text)
            texts.append(text)
        return texts

    def _generation_rule(self, kwargs: dict[str, Any], n: int) -> tuple[list[str], int]:
        """A request's until strings and token limit; ``ValueError`` naming the request for sampling."""
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) and u for u in until):
            raise ValueError(f"request {n}: 'until' must be a list of non-empty strings (got {until!r})")
        limit = kwargs.pop("max_gen_toks", self.max_gen_toks)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"request {n}: 'max_gen_toks' must be a positive whole number (got {limit!r})")
        temperature = kwargs.pop("temperature", 0.0) or 0.0
        if kwargs.pop("do_sample", False) and temperature > 0:
            raise ValueError(f"request {n}: the task asks for sampling (do_sample, temperature {temperature}); "
                             f"the {MODEL_NAME} model decodes greedily only")
        return until, limit


def register() -> None:
    """Make ``WorkbenchLM`` known to lm-eval as ``workbench`` (once per process)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(WorkbenchLM)


def _job_model(job_id: str) -> dict[str, Any]:
    """``--job N``: the model_args of job N (its adapter, or a base model's evaluate spec). The job's folder
    and spec are in the workbench's database, so this one flag asks the jobs service (the only place
    core reads it); everything else here is the engine's own."""
    from jobs.lmeval_jobs import job_model_args

    return job_model_args(job_id)


def main(argv: list[str] | None = None) -> int:
    """``python -m core.lmeval`` (see the module docstring); lm-eval's exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m core.lmeval", allow_abbrev=False,
        description="Run lm-evaluation-harness on a workbench model. Every argument not listed here goes "
                    "to lm-eval's own 'run' command (--tasks, --limit, --num_fewshot, --output_path, ...).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", help="a training, merge or weight-search job's adapter, by job id")
    which.add_argument("--adapter", help="an adapter folder (a run's adapter/)")
    which.add_argument("--base", help="a base model (catalogue name, checkpoint folder or hub id) without adapter")
    parser.add_argument("--precision", help="override the model's precision (fp32, bf16, fp16, auto)")
    ours, rest = parser.parse_known_args(argv)
    if any(a == "--model" or a.startswith("--model=") or a == "-M" for a in rest):
        parser.error("--model is ours (workbench); choose the model with --job, --adapter or --base")
    if ours.job is not None:
        try:
            model_args = _job_model(ours.job)
        except Exception as err:  # no such job, not an adapter job, no adapter yet, the database: one line
            return cli_error(f"--job {ours.job}: {err}", 2)
    elif ours.adapter is not None:
        if not Path(ours.adapter).is_dir():
            parser.error(f"--adapter {ours.adapter}: no such folder (a run's adapter/ folder)")
        model_args = {"adapter": str(Path(ours.adapter).resolve())}
    else:
        model_args = {"base": ours.base}
    if ours.precision:
        model_args["precision"] = ours.precision
    register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in rest):
        rest = ["--batch_size", "8", *rest]  # lm-eval's default is 1 request at a time; ours batches
    sys.argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", json.dumps(model_args), *rest]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from core.lmeval import main as _main  # the module's own copy, not __main__'s: one registered class

    sys.exit(_main())
