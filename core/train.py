"""The training recipe: setup -> train -> cleanup, reporting through callbacks, resumable exactly.

Where the time goes on a CPU, and what this loop does about it (the first two always, the rest the
speed paths that ``TrainSettings.kernels = "fast"`` turns on, part by part in ``KERNELS``; "reference"
trains through the plain Hugging Face forward and autograd instead, what tests compare with):

- matmuls: the frozen base weights are kept in bf16 and the forward runs under bf16 autocast where
  the hardware has bf16 units (AMX / AVX-512-bf16 here, ~6x fp32); adapter weights stay fp32;
- padding: examples are grouped by length (shuffled chunks sorted by length, then batches shuffled),
  micro-batches padded only to their own longest row;
- the vocabulary projection (``head_loss``): logits are computed only at positions whose next token
  is labelled (prompt tokens masked from the loss never reach the 49k-wide head), a chunk of tokens at
  a time, with their gradient made at once: no full logits tensor is ever kept;
- memory passes: LLaMA-style RMSNorms take a three-pass forward and a hand-written backward
  (``norm``: ``fast_norm``) instead of the upcasting original; grouped-query attention runs without
  copying key/value heads (``attention``: ``fast_attention``; eager attention for other models, which
  beats SDPA on a CPU); LoRA on a frozen bf16 linear trains through one written-out autograd function
  (``lora_function``: ``adapters.lora``); dropout masks cost a quarter of the usual random numbers and
  LoRA modules reading the same input (q, k, v) share one mask (``dropout``: ``FastDropout``; this
  changes LoRA's dropout slightly: the three projections see the same dropped features);
- page faults and resident memory (``memory``, on a CPU; process-level): freed activations stay in the
  process's heap for reuse, and oneDNN's cache of matmul kernels is kept to 64 entries (``host_memory``).

On CUDA the weights are bf16 (``precision`` auto), attention is PyTorch's SDPA, and the speed paths of
``CPU_ONLY`` are off: they were measured on CPUs only (``head_loss`` stays: it never forms the full
logits tensor, a memory saving on any device). A bench passing ``parts`` explicitly gets what it asks.

The loss of an optimiser step is the mean over every labelled token of the whole batch, however it is
cut into micro-batches, so gradient accumulation does not change the maths.

Several processes (``train.devices`` > 1, under torchrun; ``core.distributed``): every rank plans the
same global batch (``plan_epoch`` with ``batch_size``, as one process does), sorts it by length and
takes every N-th example (``data.shard``); each rank's loss is divided by the labelled tokens of the
whole global batch, which every rank counts from the same plan, and the adapter's gradients are summed
over the ranks after the accumulation. So N ranks compute the loss, gradient and update of one process.
Validation is split the same way. Rank 0 alone reports (callbacks, ``metrics.jsonl``) and writes the
spec, checkpoints and adapter, and decides each step whether to stop; a checkpoint holds what one
process would save, so a run resumes on any number of processes.
"""

from __future__ import annotations

import math
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed, fast_attention, fast_norm, host_memory
from .adapters.base import FastDropout, MaskShare
from .arch import arch_for, get_backbone
from .callbacks import CallbackList, EvalReport, MetricsFile, StepReport, TrainCallbacks
from .config import JobSpec
from .fields import ConfigError
from .head_loss import head_loss
from .inject import adapters_of, attach, load_adapter, prompt_lengths, save_adapter, trainable_report
from .models import load_model, resolve_device, resolve_dtype


@dataclass
class TrainResult:
    status: str  # "completed" or "stopped"
    steps: int
    total_steps: int
    final_loss: float | None
    best_val_loss: float | None
    adapter_dir: Path
    elapsed_s: float
    peak_memory_mb: float
    trainable_params: int
    tokens_per_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
CHUNK_BATCHES = 16  # length grouping sorts within chunks of this many batches, keeping epochs random

# The speed paths each ``TrainSettings.kernels`` value turns on (see the module docstring); a bench can
# hand ``Trainer`` any subset to measure what one part buys.
KERNELS: dict[str, frozenset[str]] = {
    "fast": frozenset({"memory", "attention", "norm", "head_loss", "lora_function", "dropout"}),
    "reference": frozenset(),
}
# The parts measured faster on CPUs only: off on CUDA (see the module docstring) unless a bench asks.
CPU_ONLY = frozenset({"memory", "attention", "norm", "lora_function", "dropout"})


def install_kernels(model: nn.Module, parts: frozenset[str] | set[str], device: torch.device) -> None:
    """Put the model-level speed paths named in ``parts`` in place (adapter attached), the rest plain.

    With none, the model computes as plain Hugging Face + autograd would: its own attention and norms
    and, for every adapter, an independent ``nn.Dropout`` per module. Call on a freshly loaded model:
    patched norms and attention are not put back. (``head_loss`` is ``Trainer.batch_loss``'s choice,
    ``memory`` the process's, made before the model loads.) On CUDA attention is always PyTorch's SDPA
    (for a model that has it).
    """
    if device.type == "cuda" and getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, AttributeError):  # a model (its own code) without an SDPA attention
            pass
    if "attention" in parts and device.type == "cpu" and hasattr(model, "set_attn_implementation"):
        # Measured on SmolLM2 with ~130-token rows: eager attention trains 16% faster than SDPA on CPU,
        # and the grouped eager attention of ``fast_attention`` faster still.
        if not fast_attention.patch(model):
            model.set_attn_implementation("eager")
    if "norm" in parts:
        fast_norm.patch(model)
    share = MaskShare()
    for module in model.modules():
        if hasattr(module, "use_training_kernels"):  # adapters with a fast route of their own (LoRA)
            module.use_training_kernels("lora_function" in parts, "dropout" in parts, share)
    if "dropout" not in parts:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is FastDropout and child.rescale:  # the bottleneck adapters' dropout
                    setattr(parent, name, nn.Dropout(child.p))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints``, or None."""
    root = Path(out_dir) / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "state.pt").is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices for one epoch: random, but each batch of similar lengths.

    Deterministic in (seed, epoch), which is what makes the data position resumable.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def pack_micro_batches(examples: list, token_budget: int) -> list[list]:
    """Cut length-sorted examples into micro-batches of at most ``token_budget`` padded tokens.

    The budget is ``micro_batch_size * cutoff_len``: the most a micro-batch of the user's size can hold,
    so memory never exceeds what the setting allows, while short rows travel in larger, faster batches.
    """
    batches: list[list] = []
    for e in examples:
        if batches and (len(batches[-1]) + 1) * max(len(e.input_ids), len(batches[-1][-1].input_ids)) <= token_budget:
            batches[-1].append(e)
        else:
            batches.append([e])
    return batches


class Trainer:
    """One training run of a ``JobSpec`` into ``out_dir``."""

    def __init__(self, spec: JobSpec, out_dir: str | Path, callbacks: TrainCallbacks | None = None,
                 parts: frozenset[str] | set[str] | None = None):
        """``parts``: the speed paths to use, by default ``KERNELS[spec.train.kernels]`` (benches only)."""
        self.spec = spec.validate()
        self.out_dir = Path(out_dir)
        self.cb = CallbackList([MetricsFile(self.out_dir / "metrics.jsonl"), callbacks or TrainCallbacks()])
        self.t = spec.train
        self.parts = frozenset(KERNELS[self.t.kernels] if parts is None else parts)
        self.parts_given = parts is not None
        self.ranks = distributed.Ranks()  # one process until setup joins the others
        if self.parts - KERNELS["fast"]:
            raise ValueError(f"unknown kernel parts {sorted(self.parts - KERNELS['fast'])}")

    # ---------------------------------------------------------------------------------------- setup
    def setup(self, resume_from: str | Path | None = None) -> None:
        """Load data and model, attach the adapter, build optimiser and schedule; restore a checkpoint.

        Everything that can be wrong with the data or the settings fails here, before any step.
        """
        spec, t = self.spec, self.t
        if distributed.world_size() != t.devices:
            raise ConfigError("train.devices", _world_mismatch(t.devices, distributed.world_size()))
        device = resolve_device(spec.model.device)
        self.ranks = distributed.join(device, t.rank_timeout_s)
        self.device = self.ranks.device(device)
        if not self.ranks.main:
            self.cb = CallbackList([])  # rank 0 reports for all
        if self.device.type == "cuda" and not self.parts_given:
            self.parts -= CPU_ONLY
        if self.device.type == "cpu" and "memory" in self.parts:
            host_memory.retain_freed_memory()
            host_memory.limit_onednn_cache()
        self.dtype = resolve_dtype(spec.model.precision, self.device)
        loaded = load_model(spec.model, dtype=self.dtype if self.dtype != torch.float32 else None)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

        records = data_mod.load_records(spec.data.source, spec.data.columns, spec.data.limit)
        train_rows, val_rows = data_mod.split_records(records, spec.data.val_size, t.seed)
        tok = dict(template=spec.data.template, cutoff_len=spec.data.cutoff_len,
                   train_on_inputs=spec.data.train_on_inputs)
        self.train_data = data_mod.tokenize_records(train_rows, self.tokenizer, **tok)
        self.val_data = data_mod.tokenize_records(val_rows, self.tokenizer, **tok) if val_rows else None
        if not self.train_data.examples:
            raise ConfigError("data.source", "no training example has a response token left after truncation")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        torch.manual_seed(t.seed)
        random.seed(t.seed)
        attach(self.model, spec.adapter, tokenizer=self.tokenizer)
        spec_arch = arch_for(self.model, spec.adapter.arch)
        self.backbone = get_backbone(self.model, spec_arch)
        self.head = self.model.get_output_embeddings()
        self.lengths = [len(e.input_ids) for e in self.train_data.examples]
        if not self.ranks.same([len(self.lengths), sum(self.lengths)]):  # each rank plans every batch itself
            raise ConfigError("data.source", "the training processes read different data: did the file change "
                                             "while they loaded it?")
        self.steps_per_epoch = math.ceil(len(self.lengths) / t.batch_size)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self._build_optimizer()  # the schedule reads total_steps
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.best_val: float | None = None
        self.last_loss: float | None = None
        self.elapsed_before = 0.0
        if resume_from is not None:
            self._restore(Path(resume_from))  # builds the adapter modules anew
        self.ranks.broadcast_params(self.params)
        install_kernels(self.model, self.parts, self.device)
        if self.ranks.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "spec.json").write_text(spec.to_json())
        self.report = trainable_report(self.model)

    def _build_optimizer(self) -> None:
        """AdamW over the adapter's parameters, its schedule, and ``self.params`` for gradient clipping.

        Parameter groups: weight decay on matrices only, and each adapter module's ``lr_scales``
        (LoRA+ trains B at a multiple of A's learning rate), in a fixed order so a checkpoint's
        optimiser state restores into the same groups.
        """
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for module in adapters_of(self.model):
            scales = module.lr_scales()
            for name, p in module.adapter_named_params():
                if p.requires_grad:
                    groups.setdefault((p.dim() >= 2, float(scales.get(name, 1.0))), []).append(p)
        self.params = [p for ps in groups.values() for p in ps]
        t = self.t
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0, "lr": t.learning_rate * scale}
             for (decay, scale), ps in sorted(groups.items())], lr=t.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        t = self.t
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, self.total_steps - t.warmup_steps)
        progress = min(1.0, progress)
        if t.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    # ------------------------------------------------------------------------------------- forward
    def _autocast(self):
        enabled = self.dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def batch_loss(self, batch: dict[str, torch.Tensor],
                   prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Summed token loss of a micro-batch and its number of labelled tokens.

        With the ``head_loss`` part: the backbone, then the LM head only at positions whose next token
        is labelled (``head_loss``). Without: the model's own forward, logits at every position, and
        the cross-entropy Hugging Face computes on them (in fp32). ``prompts``: each row's prompt length
        (``data.prompt_lengths``), for adapters that act on prompt positions (LoReFT).
        """
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        targets = labels[:, 1:]
        keep = targets != -100
        if "head_loss" not in self.parts:
            with prompt_lengths(self.model, prompts), self._autocast():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            return loss, int(keep.sum())
        with prompt_lengths(self.model, prompts), self._autocast():
            hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            loss = head_loss(self.head, hidden[:, :-1][keep], targets[keep])
        return loss, int(keep.sum())

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self.val_data or not self.val_data.examples:
            return None
        self.model.eval()
        examples = sorted(self.val_data.examples, key=lambda e: len(e.input_ids))
        mine = data_mod.shard(examples, self.ranks.rank, self.ranks.world)
        total, count = 0.0, 0
        for part in pack_micro_batches(mine, self.t.micro_batch_size * self.spec.data.cutoff_len):
            loss, n = self.batch_loss(data_mod.collate(part, self.pad_id), data_mod.prompt_lengths(part))
            total += loss.item()
            count += n
        self.model.train()
        total, count = self.ranks.sum([total, count])
        return total / max(count, 1)

    # --------------------------------------------------------------------------------------- train
    def _batches(self) -> Iterator[list[int]]:
        while True:
            plan = plan_epoch(self.lengths, self.t.batch_size, self.t.seed, self.epoch)
            while self.batch_in_epoch < len(plan):
                yield plan[self.batch_in_epoch]  # the training loop advances batch_in_epoch
            self.epoch += 1
            self.batch_in_epoch = 0

    def train(self) -> TrainResult:
        t = self.t
        start = time.perf_counter()
        first_step, tokens_total = self.step, 0
        self.cb.on_start({"total_steps": self.total_steps, "start_step": self.step, **self.report,
                          "train_examples": len(self.lengths),
                          "val_examples": len(self.val_data.examples) if self.val_data else 0,
                          "truncated": self.train_data.num_truncated, "dtype": str(self.dtype),
                          "device": str(self.device), "processes": self.ranks.world})
        self.model.train()
        status = "completed"
        tokens_window, time_window = 0, 0.0
        batches = self._batches()
        while self.step < self.total_steps:
            if self.ranks.agree(self.cb.should_stop()):
                status = "stopped"
                break
            self.ranks.seed_step(t.seed, self.step)
            step_start = time.perf_counter()
            indices = next(batches)
            examples = sorted((self.train_data.examples[i] for i in indices), key=lambda e: len(e.input_ids))
            # the whole global batch's count, the same on every rank: the loss is its mean over all ranks
            label_total = sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
            mine = data_mod.shard(examples, self.ranks.rank, self.ranks.world)
            micro = pack_micro_batches(mine, t.micro_batch_size * self.spec.data.cutoff_len)
            step_loss, step_tokens = 0.0, 0
            for part in micro:
                batch = data_mod.collate(part, self.pad_id)
                loss, _ = self.batch_loss(batch, data_mod.prompt_lengths(part))
                (loss / max(label_total, 1)).backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            self.ranks.sync_gradients(self.params)  # these two: nothing with one process
            step_loss, step_tokens = self.ranks.sum([step_loss, step_tokens])
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")).item()
            lr = t.learning_rate * self._lr_factor(self.scheduler.last_epoch)  # groups may scale it
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.batch_in_epoch += 1
            self.step += 1
            self.last_loss = step_loss / max(label_total, 1)

            dt = time.perf_counter() - step_start
            tokens_window += step_tokens
            tokens_total += step_tokens
            time_window += dt
            elapsed = self.elapsed_before + time.perf_counter() - start
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                done_here = max(1, self.step - first_step)
                per_step = (time.perf_counter() - start) / done_here
                report = StepReport(step=self.step, total_steps=self.total_steps,
                                    epoch=self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                                    loss=self.last_loss, lr=lr, grad_norm=grad_norm,
                                    tokens_per_s=tokens_window / max(time_window, 1e-9), elapsed_s=elapsed,
                                    eta_s=per_step * (self.total_steps - self.step))
                tokens_window, time_window = 0, 0.0
                self.cb.on_step(report)
            last = self.step == self.total_steps
            if (t.eval_every and self.step % t.eval_every == 0) or last:
                self._evaluate_now()
            if t.save_every and self.step % t.save_every == 0 and not last and self.ranks.main:
                self._checkpoint(elapsed)
        elapsed = self.elapsed_before + time.perf_counter() - start
        adapter_dir = self.out_dir / "adapter"
        if self.ranks.main:
            if status == "stopped":
                self._checkpoint(elapsed)
            save_adapter(self.model, adapter_dir, extra={"training": {
                "status": status, "steps": self.step, "total_steps": self.total_steps,
                "final_loss": self.last_loss, "best_val_loss": self.best_val, "spec": self.spec.to_dict()}})
        self.model.eval()
        return TrainResult(status=status, steps=self.step, total_steps=self.total_steps,
                           final_loss=self.last_loss, best_val_loss=self.best_val, adapter_dir=adapter_dir,
                           elapsed_s=elapsed, peak_memory_mb=peak_memory_mb(self.device),
                           trainable_params=self.report["trainable"],
                           tokens_per_s=tokens_total / max(time.perf_counter() - start, 1e-9),
                           info=self.report)

    def _evaluate_now(self) -> None:
        val = self.validate()
        if val is None:
            return
        self.best_val = val if self.best_val is None else min(self.best_val, val)
        epoch = self.epoch + self.batch_in_epoch / self.steps_per_epoch
        self.cb.on_eval(EvalReport(step=self.step, epoch=epoch, val_loss=val))

    # ---------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, elapsed: float) -> Path:
        root = self.out_dir / CHECKPOINTS
        path = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.model, tmp / "adapter")
        torch.save({
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "best_val": self.best_val, "last_loss": self.last_loss, "elapsed": elapsed,
            "spec": self.spec.to_dict(),
        }, tmp / "state.pt")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        self.cb.on_checkpoint(self.step, path)
        return path

    def _restore(self, path: Path) -> None:
        state_file = path / "state.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"no checkpoint at {path} (state.pt missing)")
        state = torch.load(state_file, weights_only=False)
        saved = JobSpec.from_dict(state["spec"])
        if saved.adapter.to_dict() != self.spec.adapter.to_dict():
            raise ConfigError("adapter", "the checkpoint was trained with other adapter settings")
        from .inject import detach
        detach(self.model)
        load_adapter(self.model, path / "adapter", tokenizer=self.tokenizer)
        self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_val, self.last_loss, self.elapsed_before = state["best_val"], state["last_loss"], state["elapsed"]

    def cleanup(self) -> None:
        self.model = None
        self.optimizer = None
        self.ranks.leave()


def _world_mismatch(devices: int, world: int) -> str:
    if world == 1:
        return (f"is {devices}, but this is one process: start it under torchrun (python -m torch.distributed.run "
                f"--standalone --nproc-per-node {devices} -m core train ...), or set train.devices to 1")
    return f"is {devices}, but torchrun started {world} processes: set train.devices to {world}"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(spec: JobSpec, out_dir: str | Path, callbacks: TrainCallbacks | None = None,
          resume_from: str | Path | None = None) -> TrainResult:
    """Fine-tune the adapter ``spec`` describes; write spec, metrics, checkpoints and adapter to ``out_dir``."""
    trainer = Trainer(spec, out_dir, callbacks)
    try:
        trainer.setup(resume_from)
        return trainer.train()
    finally:
        trainer.cleanup()
