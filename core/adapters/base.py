"""What every adapter module shares: an on/off switch and the parameters it owns."""

from __future__ import annotations

from typing import Iterator

from torch import nn


class AdapterModule(nn.Module):
    """Base of every adapter. Subclasses keep the frozen module they wrap (if any) in ``self.base``.

    ``adapter_params()`` yields the trainable parameters this adapter owns: everything but ``base``.
    Setting ``enabled = False`` makes the module behave exactly like what it wraps.
    """

    enabled: bool = True

    def adapter_params(self) -> Iterator[nn.Parameter]:
        base = getattr(self, "base", None)
        skip = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
        for p in self.parameters():
            if id(p) not in skip:
                yield p

    def adapter_named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.adapter_params()}
        for name, p in self.named_parameters():
            if id(p) in ids:
                yield name, p

    def detach(self) -> nn.Module | None:
        """Remove hooks this adapter installed; return the module to put back in its place (or None)."""
        return getattr(self, "base", None)


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()
