"""LoRA initialisations from the frozen weight itself: PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024).

Both start ``A`` and ``B`` from a rank-``r`` part of ``W`` instead of random and zero, and train on the
residual ``W - s B0 A0`` (``s`` the LoRA scaling, ``A0``, ``B0`` the initial factors), so the adapted
layer still computes ``W x`` at the start:

- PiSSA: the top-``r`` singular triplets ``W ≈ U_r S_r Vh_r``; ``A0 = sqrt(S_r / s) Vh_r``,
  ``B0 = U_r sqrt(S_r / s)``, so that ``s B0 A0`` is exactly the principal part. ``pissa_fast`` finds
  them by randomized SVD (``torch.svd_lowrank``, ``FAST_SVD_ITERS`` subspace iterations, as the
  authors' ``pissa_niter_4``): seconds instead of minutes on a 7B model, slightly off the true top-r,
  which costs nothing since the residual is computed from whatever ``B0 A0`` came out.
- OLoRA: the thin QR ``W = Q R``; ``B0 = Q[:, :r]`` (orthonormal columns), ``A0 = R[:r]``; as in the
  author's PEFT implementation the factors are not divided by ``s``, so the residual is
  ``W - s Q_r R_r``.
"""

from __future__ import annotations

import torch

INITS = ("kaiming", "pissa", "pissa_fast", "olora")  # kaiming: LoRA's own (A random, B zero)
FAST_SVD_ITERS = 4


def initial_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` (k x in, out x k, fp32, ``k = min(r, out, in)``: no more directions than ``W`` has)
    for an (out x in) ``weight``, by ``init`` (PiSSA or OLoRA).

    On the ``meta`` device (the estimate's shapes-only models) the factors are shapes only.
    """
    out_features, in_features = weight.shape
    k = min(r, out_features, in_features)
    if weight.is_meta:
        return (weight.new_empty(k, in_features, dtype=torch.float32),
                weight.new_empty(out_features, k, dtype=torch.float32))
    w = weight.detach().float()
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:k].contiguous(), q[:, :k].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    elif init == "pissa_fast":
        u, s, v = torch.svd_lowrank(w, q=k, niter=FAST_SVD_ITERS)
        vh = v.T
    else:
        raise ValueError(f"unknown initialisation {init!r}; known: {', '.join(INITS)}")
    root = (s / scaling).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()
