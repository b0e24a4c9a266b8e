"""How the source attention map P_s reaches the fused op: the one definition of the source forms.

Callers pass a tuple (or None); `Source.of` parses it once, and every backend, the reference,
the stores and the Triton launcher read the parsed `Source`. The integer of each form is the code
the C++/CUDA op (`int source_form`, csrc/blended_attention.h mirrors it) and the Triton kernel's
SOURCE constexpr take; tests/test_source_form.py checks that the header agrees.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class SourceForm(enum.IntEnum):
    NONE = 0     # None: plain attention, no source
    QK = 1       # ("qk", q_s, k_s): P_s = softmax(q_s K_s^T * scale), recomputed on the fly
    PROBS = 2    # ("probs", P_s[, row_scale]): a stored map, fp32/fp16/bf16 or fp8 with a per-row scale
    LOWRANK = 3  # ("lowrank", U, W): P_s = U W

    @classmethod
    def named(cls, name) -> "SourceForm":
        """A form from its tuple name ('qk', 'probs', 'lowrank'), None (NONE) or itself."""
        if name is None or isinstance(name, SourceForm):
            return cls.NONE if name is None else name
        return cls[name.upper()]

    @property
    def label(self) -> str | None:
        """The name callers write in the tuple (None for NONE)."""
        return None if self is SourceForm.NONE else self.name.lower()


NAMES = tuple(form.label for form in SourceForm if form is not SourceForm.NONE)


@dataclass(frozen=True)
class Source:
    """A parsed source: `a` is q_s / P_s / U, `b` is k_s / W, `row_scale` the fp8 map's scale."""

    form: SourceForm
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    @classmethod
    def of(cls, source) -> "Source":
        if isinstance(source, Source):
            return source
        if source is None:
            return cls(SourceForm.NONE)
        if not isinstance(source, tuple) or not source or source[0] not in NAMES:
            raise ValueError(f"source must be None or a tuple whose first item is one of {NAMES}")
        form = SourceForm[source[0].upper()]
        sizes = {SourceForm.QK: (3,), SourceForm.PROBS: (2, 3), SourceForm.LOWRANK: (3,)}[form]
        if len(source) not in sizes:
            raise ValueError(f"source {NAMES[form - 1]!r} takes {' or '.join(str(n - 1) for n in sizes)} tensors")
        if form is SourceForm.PROBS:
            return cls(form, source[1], None, source[2] if len(source) == 3 else None)
        return cls(form, source[1], source[2])

    def check(self, q: torch.Tensor, k: torch.Tensor, kv_frames: torch.Tensor) -> None:
        """Shapes against q (B, H, Nq, D), k (F, H, Nk, D) and kv_frames (B, R)."""
        b, h, nq, _ = q.shape
        nk_total = kv_frames.shape[1] * k.shape[2]
        if self.form is SourceForm.QK:
            if self.a.shape != q.shape or self.b.shape != k.shape:
                raise ValueError("source ('qk', q_s, k_s) needs q_s shaped like q and k_s shaped like k")
        elif self.form is SourceForm.PROBS:
            if tuple(self.a.shape) != (b, h, nq, nk_total):
                raise ValueError(f"source ('probs', P_s[, row_scale]) needs P_s of shape {(b, h, nq, nk_total)}")
            if self.row_scale is not None and tuple(self.row_scale.shape) != (b, h, nq):
                raise ValueError(f"the fp8 row scale must be (B, H, Nq) = {(b, h, nq)}")
        elif self.form is SourceForm.LOWRANK:
            if self.a.shape[:3] != (b, h, nq) or tuple(self.b.shape) != (b, h, self.a.shape[3], nk_total):
                raise ValueError(f"source ('lowrank', U, W) needs U (B, H, Nq, r) and W (B, H, r, R*Nk={nk_total})")
