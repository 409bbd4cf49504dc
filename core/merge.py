"""Merge lab: combine N adapters of one LoRA family trained on the same base into a new adapter.

Each parent ``i`` is read from its saved files as factors: per module and per role block (a fused
q/k/v layer has one block per adapted role), ``ΔW_i = B_i A_i`` with the scale folded into ``B_i``
(``s = alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA). A PiSSA/OLoRA parent is its converted LoRA
of rank 2r: ``A' = [A; A0]``, ``B' = s [B, -B0]``, the update over the original base. With weights
``w_i`` the methods are, per block:

- ``cat``: ``A = [A_1; ...; A_N]``, ``B = [w_1 B_1, ..., w_N B_N]``, so ``B A = Σ w_i ΔW_i`` exactly, at
  rank ``Σ r_i``: the same model as running every parent at once with its update scaled by ``w_i``.
- ``linear`` (task arithmetic, Ilharco et al. 2023) and ``svd`` (PEFT's name for the same dense merge):
  ``M = Σ w_i ΔW_i``. PEFT's factor-averaging "linear" (``Σ √w_i B_i · Σ √w_i A_i``) has cross terms,
  is not a sum of updates, and is not offered.
- ``ties`` (Yadav et al. 2023): ``τ_i = trim(ΔW_i, density)`` keeps each tensor's ``⌊density · n⌋``
  entries of largest ``|.|``; the sign is elected by the weighted mass ``γ = sign(Σ w_i τ_i)`` (0 counts
  as +); ``M = Σ_i w_i τ_i [sign(w_i τ_i) = γ] / max(1, #{i: sign(w_i τ_i) = γ})``, the disjoint mean.
  The weights enter before the election, so a weight of 0.1 sways the sign less than one of 0.9
  (PEFT 0.21's ``ties`` elects on the unweighted ``τ_i``; with equal positive weights both agree).
- ``dare_linear`` (Yu et al. 2024): ``τ_i = ΔW_i ⊙ m_i / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` drawn
  from ``mask_generator(seed, module, block, i)``; ``M = Σ w_i τ_i``.
- ``dare_ties``: DARE's ``τ_i``, then TIES' election and disjoint mean (no magnitude trim).
- ``magnitude_prune``: ``M = Σ w_i trim(ΔW_i, density)``.

Every method but ``cat`` then truncates ``M`` to rank ``r'`` by SVD, ``M ≈ U_r' S_r' V_r'^T`` with
``B = U √S``, ``A = √S V^T``, and reports the retained energy ``Σ_{k≤r'} σ_k² / Σ_k σ_k²`` (1 = exact).

DoRA parents give a DoRA result: the LoRA part ``V - W`` merges as above and the magnitude vectors are
averaged by the same weights, ``m = Σ w_i m_i / Σ w_i``. The result is an adapter directory of our
format (``core.load_adapter`` reads it) with ``r = r'``, ``alpha = r'`` (scale 1, kaiming init), so it
chats, evaluates, exports in the PEFT layout and can be merged again.

Which methods can merge is the method record's ``merge_family`` (``core.methods``): none of VeRA, (IA)³,
the bottleneck and prompt methods and LoReFT have an update that is a low-rank ``B A`` linear in its
factors. ``delta_norms`` gives ``||ΔW||_F`` per layer and module from the files alone (the heat map).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from . import methods, progress
from .config import AdapterConfig
from .fields import ConfigError, show
from .inject import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config

MERGE_METHODS = {"cat": "cat (ranks concatenated, exact)", "linear": "linear (weighted sum, SVD to r')",
                 "svd": "svd (as linear; PEFT's name)", "ties": "TIES (trim, elect sign, disjoint mean)",
                 "dare_linear": "DARE-linear (random drop and rescale)", "dare_ties": "DARE-TIES",
                 "magnitude_prune": "magnitude prune"}
USES_DENSITY = ("ties", "magnitude_prune")
USES_DROP = ("dare_linear", "dare_ties")
MAX_RANK = 4096  # LoraSettings.r's bound
REPORT_FILE = "merge_report.json"
_KEY = re.compile(r"(.+)\.(lora_A|lora_A0|lora_B0|lora_B\.(\d+)|lora_magnitude\.(\d+))")
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass
class MergeSettings:
    """How to merge (see the module docstring for each method's formula).

    Attributes:
        method: one of ``MERGE_METHODS``.
        weights: one finite weight per parent, not all zero (DoRA: their sum must be positive).
        rank: the result's rank ``r'`` (None: the largest parent rank); ``cat`` keeps ``Σ r_i`` and takes none.
        density: the fraction of each ΔW's entries TIES and magnitude prune keep, in (0, 1].
        drop: DARE's drop probability ``p``, in [0, 1).
        seed: seeds DARE's masks.
    """

    method: str = "ties"
    weights: list[float] = field(default_factory=list)
    rank: int | None = None
    density: float = 0.2
    drop: float = 0.5
    seed: int = 0

    def validate(self, n_parents: int) -> "MergeSettings":
        """Check every field (``ConfigError`` naming it)."""
        if self.method not in MERGE_METHODS:
            raise ConfigError("method", f"unknown merge method {show(self.method)}; use {', '.join(MERGE_METHODS)}")
        if not isinstance(self.weights, (list, tuple)) or len(self.weights) != n_parents:
            raise ConfigError("weights", f"give one weight per adapter ({n_parents}), got {show(self.weights)}")
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError("weights", f"each weight must be a finite number (got {show(w)})")
        if not any(self.weights):
            raise ConfigError("weights", "at least one weight must be non-zero")
        if self.rank is not None:
            if self.method == "cat":
                raise ConfigError("rank", "cat keeps every rank (the sum of the parents' ranks); leave rank unset")
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
                raise ConfigError("rank", f"must be a whole number from 1 to {MAX_RANK} (got {show(self.rank)})")
        _check_fraction("density", self.density, low_open=True, high_open=False)
        _check_fraction("drop", self.drop, low_open=False, high_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be a whole number from 0 (got {show(self.seed)})")
        self.weights = [float(w) for w in self.weights]
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fraction(name: str, value: Any, low_open: bool, high_open: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        span = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(name, f"must be a number in {span} (got {show(value)})")


@dataclass
class Block:
    """One role block of one module: ``ΔW = B @ A`` (scale folded into ``B``), DoRA's magnitudes or None."""

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None


@dataclass
class Parent:
    """A parent adapter as read from its directory: name (for messages), metadata, method, blocks by
    ``(module path, role index)``."""

    name: str
    meta: dict[str, Any]
    method: methods.Method
    blocks: dict[tuple[str, int], Block]

    @property
    def rank(self) -> int:
        return next(iter(self.blocks.values())).A.shape[0]


def read_parent(directory: str | Path, name: str | None = None) -> Parent:
    """Read an adapter directory as factors (see ``Block``); ``ConfigError`` naming the adapter when its
    method cannot merge or its files are not those of a LoRA-family adapter."""
    name = name or str(directory)
    meta = read_adapter_config(directory)
    method = methods.get(meta["adapter"]["method"])
    if method.merge_family is None:
        able = ", ".join(m.label for m in methods.all() if m.merge_family)
        raise ConfigError("adapters", f"{name} is a {method.label} adapter, which cannot be merged: its update is "
                                      f"not a low-rank B·A linear in its factors (methods that merge: {able})")
    cfg = AdapterConfig.from_dict(meta["adapter"])
    s = cfg.settings
    scale = s.alpha / math.sqrt(s.r) if s.rslora else s.alpha / s.r
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ConfigError("adapters", f"{name}: unexpected tensor {key!r} for a {method.label} adapter")
        by_path.setdefault(m.group(1), {})[key[len(m.group(1)) + 1:]] = value.float()
    blocks = {}
    for path, t in by_path.items():
        Bs = [t[f"lora_B.{i}"] for i in range(sum(k.startswith("lora_B.") for k in t))]
        As = t["lora_A"].split(s.r)
        if "lora_A0" in t:
            A0s, B0s = t["lora_A0"].split(s.r), t["lora_B0"].split([b.shape[0] for b in Bs])
            pairs = [(torch.cat([a, a0]), torch.cat([b, -b0], 1)) for a, b, a0, b0 in zip(As, Bs, A0s, B0s)]
        else:
            pairs = list(zip(As, Bs))
        for i, (a, b) in enumerate(pairs):
            blocks[(path, i)] = Block(a, b * scale, t.get(f"lora_magnitude.{i}"))
    if not blocks:
        raise ConfigError("adapters", f"{name} holds no LoRA tensors")
    return Parent(name, meta, method, blocks)


def check_compatible(parents: Sequence[Parent]) -> None:
    """Same family, base model, model type, layers and adapted modules (with the same shapes), else a
    ``ConfigError`` naming the adapter that differs from the first and how."""
    first = parents[0]
    for p in parents[1:]:
        why = None
        if p.method.merge_family != first.method.merge_family:
            why = f"is {p.method.label}, {first.name} is {first.method.label}: one merge takes one family"
        elif p.meta.get("base_model") != first.meta.get("base_model") or p.meta.get("model_type") != \
                first.meta.get("model_type"):
            why = (f"was trained on base model {p.meta.get('base_model')!r}, {first.name} on "
                   f"{first.meta.get('base_model')!r}")
        elif set(p.blocks) != set(first.blocks):
            missing = sorted({k[0] for k in set(first.blocks) - set(p.blocks)})
            extra = sorted({k[0] for k in set(p.blocks) - set(first.blocks)})
            why = (f"adapts other modules (other targets or layers) than {first.name}: lacks {missing[:3]}, "
                   f"has {extra[:3]} more")
        else:
            for key, b in p.blocks.items():
                f = first.blocks[key]
                if (b.B.shape[0], b.A.shape[1]) != (f.B.shape[0], f.A.shape[1]):
                    why = f"has {key[0]} of shape {(b.B.shape[0], b.A.shape[1])}, {first.name} of " \
                          f"{(f.B.shape[0], f.A.shape[1])}"
                    break
        if why:
            raise ConfigError("adapters", f"cannot merge {p.name}: it {why}")


# --------------------------------------------------------------------------------------------------
# The formulas on dense tensors (stacked task tensors: N x out x in).

def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``⌊density · n⌋`` entries of largest magnitude set to zero."""
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        top = flat.abs().topk(k).indices
        out[top] = flat[top]
    return out.view_as(delta)


def mask_generator(seed: int, path: str, block: int, parent: int) -> torch.Generator:
    """The generator of DARE's mask for one parent's block: seeded from ``(seed, path, block, parent)``,
    so a mask does not depend on the order modules are visited in."""
    digest = hashlib.sha256(f"{seed}/{path}/{block}/{parent}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """``delta ⊙ m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``: the entry is kept when a uniform draw is ≥ p."""
    keep = torch.rand(delta.shape, generator=generator) >= drop
    return delta * keep / (1.0 - drop)


def disjoint_mean(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' elect and merge on stacked weighted task tensors ``w_i τ_i``: the sign of their sum (0 → +),
    then the mean of the entries agreeing with it."""
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == sign
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def combine(deltas: list[torch.Tensor], settings: MergeSettings, path: str = "", block: int = 0) -> torch.Tensor:
    """The merged dense update ``M`` of one block from the parents' ``ΔW_i`` (before truncation)."""
    w = torch.tensor(settings.weights).view(-1, 1, 1)
    method = settings.method
    if method in ("linear", "svd"):
        return (torch.stack(deltas) * w).sum(0)
    if method in USES_DENSITY:
        tasks = torch.stack([trim(d, settings.density) for d in deltas])
    else:
        tasks = torch.stack([dare(d, settings.drop, mask_generator(settings.seed, path, block, i))
                             for i, d in enumerate(deltas)])
    if method in ("ties", "dare_ties"):
        return disjoint_mean(tasks * w)
    return (tasks * w).sum(0)


def truncate(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, kept, total)``: ``B A`` the best rank-``rank`` approximation of ``m`` (zero-padded to
    ``rank`` when ``m`` has fewer singular values), and the kept and total ``Σ σ²``."""
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    A = m.new_zeros(rank, m.shape[1])
    B = m.new_zeros(m.shape[0], rank)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root
    squares = S.double().pow(2)
    return A, B, float(squares[:k].sum()), float(squares.sum())


# --------------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    """What a merge made: its directory, rank, parameter count, retained energy overall and per module."""

    directory: str
    method: str
    rank: int
    params: int
    energy: float
    module_energy: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_adapters(directories: Sequence[str | Path], out_dir: str | Path, settings: MergeSettings,
                   names: Sequence[str] | None = None) -> MergeResult:
    """Merge the adapters in ``directories`` into a new adapter directory ``out_dir``.

    ``names`` label the parents in errors (default: their paths). Raises ``ConfigError`` for invalid
    settings, a method that cannot merge or incompatible parents (naming which and why).
    """
    return write_merge(read_parents(directories, names), settings, out_dir)


def read_parents(directories: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Parent]:
    """The parents read and checked compatible (``ConfigError`` naming the one at fault)."""
    if not directories:
        raise ConfigError("adapters", "choose at least one adapter to merge")
    names = list(names) if names is not None else [str(d) for d in directories]
    parents = [read_parent(d, n) for d, n in zip(directories, names)]
    check_compatible(parents)
    return parents


def write_merge(parents: Sequence[Parent], settings: MergeSettings, out_dir: str | Path) -> MergeResult:
    """Merge read parents (``merge_blocks``) and write the result and its report to ``out_dir``."""
    blocks, result = merge_blocks(parents, settings, out_dir, progress_label=f"merging ({settings.method})")
    _write(Path(out_dir), parents, result.rank, blocks, {
        "method": settings.method, "settings": settings.to_dict(), "parents": [p.name for p in parents],
        "rank": result.rank, "energy": result.energy})
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def merge_blocks(parents: Sequence[Parent], settings: MergeSettings, out_dir: str | Path = "",
                 progress_label: str | None = None) -> tuple[dict[tuple[str, int], Block], MergeResult]:
    """The merged blocks of compatible ``parents``, in memory, and what they make (``out_dir``: where the
    result will be written, for its record). ``ConfigError`` for invalid settings. With
    ``progress_label``, each block merged is a ``core.progress`` report (not for the many in-memory
    merges of a weight search, whose points are its progress)."""
    settings.validate(len(parents))
    magnitudes = any(b.magnitude is not None for b in parents[0].blocks.values())
    if magnitudes and sum(settings.weights) <= 0:
        raise ConfigError("weights", "magnitude vectors (DoRA) are averaged by the weights: their sum must be positive")
    rank = result_rank([p.meta["adapter"] for p in parents], settings)
    if rank > MAX_RANK:
        raise ConfigError("rank", f"cat would make rank {rank}, over the limit of {MAX_RANK}; use another method")
    blocks: dict[tuple[str, int], Block] = {}
    kept: dict[str, list[float]] = {}
    keys = sorted(parents[0].blocks)
    for key in progress.track(keys, progress_label) if progress_label else keys:
        parts = [p.blocks[key] for p in parents]
        if settings.method == "cat":
            A = torch.cat([b.A for b in parts])
            B = torch.cat([w * b.B for w, b in zip(settings.weights, parts)], 1)
            kept_sq = total_sq = 1.0
        else:
            merged = combine([b.B @ b.A for b in parts], settings, *key)
            A, B, kept_sq, total_sq = truncate(merged, rank)
        magnitude = None
        if magnitudes:
            magnitude = sum(w * b.magnitude for w, b in zip(settings.weights, parts)) / sum(settings.weights)
        blocks[key] = Block(A, B, magnitude)
        sums = kept.setdefault(key[0], [0.0, 0.0])
        sums[0] += kept_sq
        sums[1] += total_sq
    module_energy = {path: k / t if t > 0 else 1.0 for path, (k, t) in kept.items()}
    all_kept, all_total = sum(k for k, _ in kept.values()), sum(t for _, t in kept.values())
    energy = all_kept / all_total if all_total > 0 else 1.0
    params = sum(b.A.numel() + b.B.numel() for b in blocks.values())
    return blocks, MergeResult(str(out_dir), settings.method, rank, params, energy, module_energy)


def parent_rank(adapter: dict[str, Any]) -> int:
    """The rank of a saved LoRA-family adapter's update (its config's JSON form): r, or 2r from a PiSSA/OLoRA
    start (the converted LoRA)."""
    s = AdapterConfig.from_dict(adapter).settings
    return s.r * (1 if s.init == "kaiming" else 2)


def result_rank(adapters: Sequence[dict[str, Any]], settings: MergeSettings) -> int:
    """The rank a merge makes: ``Σ r_i`` for cat, else ``settings.rank`` or the largest parent rank."""
    ranks = [parent_rank(a) for a in adapters]
    return sum(ranks) if settings.method == "cat" else settings.rank or max(ranks)


def result_config(adapters: Sequence[dict[str, Any]], rank: int) -> AdapterConfig:
    """The config of a merge of the saved adapters ``adapters`` (their configs' JSON form): their family's
    method on the first's layers and targets, rank ``rank``, alpha = rank (scale 1), kaiming init."""
    first = AdapterConfig.from_dict(adapters[0])
    family = methods.get(first.method).merge_family
    if family is None:
        raise ConfigError("adapters", f"{methods.label(first.method)} adapters cannot be merged")
    s = first.settings
    cfg = AdapterConfig.for_method(family, layers=first.layers, r=rank, alpha=float(rank), dropout=s.dropout,
                                   targets=list(s.targets), rslora=False, loraplus_ratio=1.0, init="kaiming")
    return cfg.validate()


def block_tensors(blocks: dict[tuple[str, int], Block]) -> dict[str, torch.Tensor]:
    """Merged blocks as the tensors of an adapter's weights file, keyed as the attached adapter's own
    parameters are (``core.inject.load_adapter`` matches them strictly)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(p for p, _ in sorted(blocks)):
        roles = [blocks[(path, i)] for i in range(sum(k[0] == path for k in blocks))]
        tensors[f"{path}.lora_A"] = torch.cat([b.A for b in roles]).contiguous()
        for i, b in enumerate(roles):
            tensors[f"{path}.lora_B.{i}"] = b.B.contiguous()
            if b.magnitude is not None:
                tensors[f"{path}.lora_magnitude.{i}"] = b.magnitude.contiguous()
    return tensors


def _write(out: Path, parents: Sequence[Parent], rank: int, blocks: dict[tuple[str, int], Block],
           merge_info: dict[str, Any]) -> None:
    """Write the merged blocks as an adapter of rank ``rank`` (``result_config``)."""
    cfg = result_config([p.meta["adapter"] for p in parents], rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() for k, v in block_tensors(blocks).items()}, str(out / WEIGHTS_FILE))
    keep = ("format", "format_version", "base_model", "model_type", "versions")
    meta = {**{k: parents[0].meta[k] for k in keep if k in parents[0].meta}, "adapter": cfg.to_dict(),
            "merge": merge_info}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------------------------------
# Statistics for the heat map and the estimate, from the files alone.

def block_label(path: str, block: int, n_blocks: int, targets: Sequence[str]) -> tuple[int | None, str]:
    """(layer index, module name) of a block: ``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``);
    a fused layer's blocks are named by their role (``attn.c_attn[q]``)."""
    m = _LAYER.match(path)
    layer, module = (int(m.group(2)), m.group(3)) if m else (None, path)
    if n_blocks > 1:
        fused = [t for t in dict.fromkeys(targets) if t in ("q", "k", "v")]
        module += f"[{fused[block] if len(fused) == n_blocks else block}]"
    return layer, module


def delta_norms(directory: str | Path) -> dict[str, Any]:
    """``||ΔW||_F`` per layer and module of a saved adapter, without the base model.

    ``||B A||_F² = tr((BᵀB)(AAᵀ))``: two r x r products per block. For DoRA this is the norm of its
    LoRA part ``V - W`` (its rescaling by ``m / ||V||_c`` needs the base weights). Returns
    ``{"layers": [...], "modules": [...], "norms": [[per module] per layer] (None where not adapted),
    "method": label, "rank": r}``.
    """
    parent = read_parent(directory)
    targets = AdapterConfig.from_dict(parent.meta["adapter"]).settings.targets
    counts: dict[str, int] = {}
    for path, _ in parent.blocks:
        counts[path] = counts.get(path, 0) + 1
    cells: dict[tuple[int | None, str], float] = {}
    for (path, i), b in parent.blocks.items():
        square = float(((b.B.T @ b.B) * (b.A @ b.A.T)).sum().clamp_min(0))
        cells[block_label(path, i, counts[path], targets)] = math.sqrt(square)
    layers = sorted({k[0] for k in cells}, key=lambda x: -1 if x is None else x)
    modules = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: k[1])))
    return {"layers": layers, "modules": modules, "method": parent.method.label, "rank": parent.rank,
            "norms": [[cells.get((layer, mod)) for mod in modules] for layer in layers]}


def estimate(directories: Sequence[str | Path], settings: MergeSettings,
             names: Sequence[str] | None = None) -> dict[str, Any]:
    """The rank, parameter count and file size (fp32) a merge would make, from the parents' files; the
    merge's own checks first (``ConfigError`` for invalid settings or incompatible parents, naming them)."""
    if directories:
        settings.validate(len(directories))
    parents = read_parents(directories, names)
    r = result_rank([p.meta["adapter"] for p in parents], settings)
    shapes = [(b.B.shape[0], b.A.shape[1]) for b in parents[0].blocks.values()]
    params = sum(r * (rows + cols) for rows, cols in shapes)
    params += sum(b.B.shape[0] for b in parents[0].blocks.values() if b.magnitude is not None)
    return {"rank": r, "params": params, "bytes": 4 * params}
