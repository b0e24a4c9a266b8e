"""What a backend of `blended_attention` supports, as data, and what one call needs.

Each backend module declares `CAPABILITIES` (devices, dtypes per device, head dims, source forms,
stored-map dtypes, masks). `Call.of` reduces one call to the few facts that decide whether a
backend can run it; `Capabilities.why_not(call)` answers with None or a one-line reason, which
`ops.dispatch` prints (`fatezero-fast info`) and raises for an explicitly requested backend.
A `Call` is also the key of the self-check cache (ops.selfcheck): one check per backend and key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .source import Source, SourceForm

FP8 = getattr(torch, "float8_e4m3fn", None)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PROBS_DTYPES = FLOAT_DTYPES + ((FP8,) if FP8 is not None else ())


def dtype_name(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Call:
    """The facts of one call that decide which backend can run it (hashable: the self-check key).

    device: e.g. "cpu", "cuda:0"; probs_dtype and row_scale only for the "probs" form; mask: whether a
    blend mask is given (with a source; None = full source).
    """

    device: str
    dtype: torch.dtype
    head_dim: int
    form: SourceForm
    probs_dtype: torch.dtype | None = None
    row_scale: bool = False
    mask: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, source: Source, mask: torch.Tensor | None) -> "Call":
        dev = q.device
        device = dev.type if dev.index is None or dev.type == "cpu" else f"{dev.type}:{dev.index}"
        probs = source.form is SourceForm.PROBS
        return cls(device, q.dtype, int(q.shape[-1]), source.form,
                   source.a.dtype if probs else None, probs and source.row_scale is not None,
                   mask is not None and source.form is not SourceForm.NONE)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def describe(self) -> str:
        """e.g. 'cuda:0 float16 d=40 probs(float8_e4m3fn, row scale) with a mask'."""
        form = self.form.label or "plain"
        if self.form is SourceForm.PROBS:
            form += f"({dtype_name(self.probs_dtype)}{', row scale' if self.row_scale else ''})"
        mask = "" if self.form is SourceForm.NONE else (" with a mask" if self.mask else " full source")
        return f"{self.device} {dtype_name(self.dtype)} d={self.head_dim} {form}{mask}"


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. dtypes: per device type; head dims: multiples of `head_dim_multiple`
    up to `max_head_dim`; probs_dtypes: the stored map's dtypes for the "probs" form."""

    dtypes: dict = field(default_factory=dict)          # device type -> tuple of q dtypes
    forms: tuple = tuple(SourceForm)
    probs_dtypes: tuple = PROBS_DTYPES
    max_head_dim: int = 256
    head_dim_multiple: int = 8
    masks: bool = True                                  # takes a (B, Nq) blend mask in [0, 1]
    notes: dict = field(default_factory=dict)           # device type -> why a dtype is missing there

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.dtypes)

    def why_not(self, call: Call) -> str | None:
        """None when the backend supports the call, else one line saying what it does not support."""
        kind = call.device_type
        if kind not in self.dtypes:
            return f"runs on {' and '.join(self.devices)} only, not {kind}"
        dtypes = self.dtypes[kind]
        if call.dtype not in dtypes:
            note = f" ({self.notes[kind]})" if kind in self.notes else ""
            return f"takes {', '.join(dtype_name(d) for d in dtypes)} on {kind}, not {dtype_name(call.dtype)}{note}"
        if call.head_dim % self.head_dim_multiple or call.head_dim > self.max_head_dim:
            return (f"head dim {call.head_dim} is not a multiple of {self.head_dim_multiple} up to "
                    f"{self.max_head_dim}")
        if call.form not in self.forms:
            return f"does not take the {call.form.label!r} source form"
        if call.form is SourceForm.PROBS and call.probs_dtype not in self.probs_dtypes:
            return (f"takes stored maps in {', '.join(dtype_name(d) for d in self.probs_dtypes)}, "
                    f"not {dtype_name(call.probs_dtype)}")
        if call.mask and not self.masks:
            return "does not take a blend mask"
        return None

    def describe(self) -> str:
        """One line: devices with dtypes, head dims, forms, stored-map dtypes."""
        per_device = "; ".join(f"{kind}: {'/'.join(dtype_name(d) for d in dts)}" for kind, dts in self.dtypes.items())
        forms = "/".join(f.label or "plain" for f in self.forms)
        return (f"{per_device}; head dims {self.head_dim_multiple}k <= {self.max_head_dim}; sources {forms}"
                + (f"; maps {'/'.join(dtype_name(d) for d in self.probs_dtypes)}"
                   if SourceForm.PROBS in self.forms else ""))
