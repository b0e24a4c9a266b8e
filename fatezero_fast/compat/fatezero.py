"""Drop-in backend for the official FateZero code (ChenyangQiQi/FateZero).

    from fatezero_fast.compat import fatezero
    fatezero.patch(store="qk")      # before the official pipeline registers its controllers
    ...                             # run test_fatezero.py / P2pDDIMSpatioTemporalPipeline unchanged

The official pipeline connects its attention controllers to the UNet with
`video_diffusion.prompt_attention.attention_util.register_attention_control(pipeline, controller)`,
which replaces the forward of every CrossAttention / SparseCausalAttention module with one that
materializes each attention map and hands it to the controller. `patch()` replaces that module
attribute (and the one in attention_register) with `register_attention_control` below, which
installs forwards that keep the official semantics without the self-attention maps:

- cross-attention (Nq x 77 maps, small): materialized and passed to the controller exactly as
  the official forward does, so the official cross fusion, reweighting, step counting and the
  SpatialBlender masks built from the stored cross maps run unchanged;
- self-attention (SparseCausalAttention): never materialized. The fused op
  (fatezero_fast.ops.blended_attention) computes sparse-causal attention with K/V gathered per
  frame. Under an official AttentionStore (inversion) the source Q and K of each controlled
  layer (query tokens <= 32*32) go to a side store keyed by (step, place, position) instead of
  the controller's self-map lists, which stay empty. Under an AttentionReplace / Refine /
  Reweight controller (editing) the conditional half blends the source in on the fly, inside the
  controller's self-replace window, with the row mask its attention_blend (SpatialBlender)
  computes from the stored cross maps: out = M softmax(Q_e K_e^T) V + (1-M) softmax(Q_s K_s^T) V.
  The controller's counters (cur_att_layer, per-key positions) advance as in the official code.
- a controller class not recognised here gets the official forwards (one-line warning).

Only the official classes themselves are recognised (exact type), since a subclass may redefine
what happens to the maps. The official code is imported, never copied: it must be importable
(on sys.path, or its checkout named by `src=` / FATEZERO_SRC).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import InputError
from ..ops.reference import source_probs
from ..ops.source import Source, SourceForm
from ..semantics.frames import resolve_frame_index
from ..stores import FORMS, make_store

MAX_CONTROLLED_TOKENS = 32 ** 2  # the official controllers keep and edit only maps with <= 32*32 queries
_CAPTURE_ATTR = "_fatezero_fast_self_capture"
_STORE_FORMS = tuple(f for f in FORMS if f != "recompute")

_official = None          # the official modules, once imported: attention_util, attention_register
_original_register = None  # the official register_attention_control
_settings: dict | None = None  # patch() arguments while patched
_warned: set = set()


# ---------------------------------------------------------------- patching

def _import_official(src: str | os.PathLike | None = None):
    """The official prompt_attention modules (attention_util, attention_register)."""
    global _official
    if _official is not None:
        return _official
    src = src or os.environ.get("FATEZERO_SRC")
    try:
        util = importlib.import_module("video_diffusion.prompt_attention.attention_util")
    except ImportError as first:
        if not src:
            raise InputError("the official FateZero code is not importable: put its checkout on sys.path or "
                             f"pass src= / set FATEZERO_SRC ({first})") from None
        if not (Path(src) / "video_diffusion" / "prompt_attention" / "attention_util.py").is_file():
            raise InputError(f"{src} is not a FateZero checkout (no video_diffusion/prompt_attention/"
                             "attention_util.py)") from None
        if str(src) not in sys.path:
            sys.path.insert(0, str(src))
        try:
            util = importlib.import_module("video_diffusion.prompt_attention.attention_util")
        except ImportError as exc:
            raise InputError(f"cannot import the official FateZero code from {src}: {exc} (install its "
                             "dependencies: einops, opencv, torchvision, diffusers 0.11.1, ...)") from None
    register_module = importlib.import_module("video_diffusion.prompt_attention.attention_register")
    _official = type("Official", (), {"util": util, "register": register_module})
    return _official


def patch(store: str = "qk", *, placement: str = "host", folder: str | os.PathLike | None = None,
          backend: str = "auto", rank: int | None = None, error_budget: float | None = None,
          src: str | os.PathLike | None = None) -> None:
    """Make the official FateZero pipeline use the fused attention (call before it runs).

    store: how inversion keeps each controlled self-attention layer's source: "qk" (source Q and
    K, exact; default), "full" (fp32 maps, as the official code), "fp16", "fp8", "lowrank"
    (fatezero_fast.stores). placement: "host", "device" or "disk" (a controller created with
    disk_store=True always uses disk, beside its own files). backend: blended_attention backend.
    src: the official checkout, when it is not importable yet (default: env FATEZERO_SRC).
    Calling it again changes the settings; `unpatch()` restores the official registration.
    """
    global _original_register, _settings
    if store not in _STORE_FORMS:
        raise InputError(f"unknown store {store!r} for the official pipeline: use one of {', '.join(_STORE_FORMS)} "
                         "(recompute needs the source branch in the UNet batch, which the official pipeline "
                         "does not run)")
    if backend not in ops.BACKENDS:
        raise InputError(f"unknown backend {backend!r}: use one of {ops.BACKENDS}")
    make_store(store, placement="host", rank=rank, error_budget=error_budget)  # validates the store options
    if placement not in ("host", "device", "disk"):
        raise InputError(f"unknown store placement {placement!r}: use host, device or disk")
    official = _import_official(src)
    if _original_register is None:
        _original_register = official.util.register_attention_control
    _settings = dict(store=store, placement=placement, folder=folder, backend=backend, rank=rank,
                     error_budget=error_budget)
    official.util.register_attention_control = register_attention_control
    official.register.register_attention_control = register_attention_control


def unpatch() -> None:
    """Give the official code its own register_attention_control back (layers registered while
    patched keep the fused forwards until the pipeline registers a controller again)."""
    global _settings
    if _official is not None and _original_register is not None:
        _official.util.register_attention_control = _original_register
        _official.register.register_attention_control = _original_register
    _settings = None


def is_patched() -> bool:
    return _settings is not None


def official_register_attention_control():
    """The official register_attention_control (materialized maps), once patch() has run."""
    return _original_register


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------- registration

class _NoControl:
    """Stands for `controller=None` (the official DummyController): attention untouched."""

    def __init__(self):
        self.num_att_layers = 0

    def __call__(self, attn, *args):
        return attn


def _controller_kind(controller) -> str | None:
    util = _official.util
    kind = type(controller)
    if controller is None or kind in (util.EmptyControl, _NoControl):
        return "empty"
    if kind is util.AttentionStore:
        return "store"
    if kind in (util.AttentionReplace, util.AttentionRefine, util.AttentionReweight):
        return "edit"
    return None


def _attention_modules(unet) -> list:
    """(module, place) for every CrossAttention / SparseCausalAttention module, in the official
    registration order (down, up, mid by the UNet's children; temporal attention skipped)."""
    found = []

    def walk(module, place):
        if type(module).__name__ in ("CrossAttention", "SparseCausalAttention"):
            found.append((module, place))
            return
        for name, child in module.named_children():
            if name != "attn_temporal":
                walk(child, place)

    for name, child in unet.named_children():
        if "down" in name:
            walk(child, "down")
        elif "up" in name:
            walk(child, "up")
        elif "mid" in name:
            walk(child, "mid")
    return found


def _head_dim(module) -> int:
    return module.to_q.out_features // module.heads


def register_attention_control(model, controller) -> None:
    """The official `register_attention_control(model, controller)` with fused self-attention.

    model: the pipeline (anything with `.unet`); controller: an official controller or None.
    Sets `controller.num_att_layers` like the official function.
    """
    if _official is None:
        _import_official()
    settings = _settings or dict(store="qk", placement="host", folder=None, backend="auto", rank=None,
                                 error_budget=None)
    kind = _controller_kind(controller)
    if kind is None:
        warnings.warn(f"fatezero_fast: unknown FateZero controller {type(controller).__name__}: "
                      "its layers use the official materialized attention", stacklevel=2)
        return _fallback(model, controller)
    modules = _attention_modules(model.unet)
    odd = [m for m, _ in modules if m.added_kv_proj_dim is not None
           or (type(m).__name__ == "SparseCausalAttention" and (_head_dim(m) % 8 or _head_dim(m) > 256))]
    if odd:
        _warn_once("odd-modules", f"fatezero_fast: {len(odd)} attention modules have added K/V projections or a "
                                  "head dim the fused op does not take (multiples of 8 up to 256): using the "
                                  "official materialized attention")
        return _fallback(model, controller)
    if controller is None:
        controller = _NoControl()
    for module, place in modules:
        if type(module).__name__ == "SparseCausalAttention":
            module.forward = _self_attention_forward(module, place, controller, kind, settings)
        else:
            module.forward = _cross_attention_forward(module, place, controller, kind, settings)
    print(f"Number of attention layer registered {len(modules)}")
    controller.num_att_layers = len(modules)


def _fallback(model, controller):
    """The official registration; an edit controller then reads its source maps from the store's
    own lists, so the sources captured by the fused path are materialized into them first."""
    original = _original_register or _official.util.register_attention_control
    if original is register_attention_control:  # patched without a saved original: cannot happen via patch()
        raise RuntimeError("the official register_attention_control is not known")
    source = getattr(controller, "additional_attention_store", None)
    if source is not None and _live_capture(source) is not None:
        _materialize_into(source)
    return original(model, controller)


# ---------------------------------------------------------------- shared pieces

def _to_out(module):
    to_out = module.to_out
    return to_out[0] if isinstance(to_out, torch.nn.ModuleList) else to_out  # no dropout, as the official forward


def _group_norm(module, hidden_states):
    if module.group_norm is not None:
        hidden_states = module.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def _split_heads(module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, _ = x.shape
    return x.view(b, n, module.heads, -1).transpose(1, 2)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _calls_controller(module, tokens: int) -> bool:
    """The official forwards hand the map to the controller unless xformers takes the layer."""
    return not (getattr(module, "_use_memory_efficient_attention_xformers", False) and tokens > MAX_CONTROLLED_TOKENS)


# ---------------------------------------------------------------- cross-attention (materialized, official semantics)

def _cross_attention_forward(module, place, controller, kind, settings):
    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None):
        if encoder_hidden_states is None and attention_mask is None:
            # a CrossAttention used as self-attention: per-frame attention through the self path
            return _self_attention(module, place, controller, kind, settings, hidden_states, None, ())
        return _materialized_attention(module, place, controller, hidden_states, encoder_hidden_states,
                                       attention_mask)
    return forward


def _materialized_attention(module, place, controller, hidden_states, encoder_hidden_states, attention_mask):
    is_cross = encoder_hidden_states is not None
    hidden_states = _group_norm(module, hidden_states)
    context = encoder_hidden_states if is_cross else hidden_states
    query = module.reshape_heads_to_batch_dim(module.to_q(hidden_states))
    key = module.reshape_heads_to_batch_dim(module.to_k(context))
    value = module.reshape_heads_to_batch_dim(module.to_v(context))
    if attention_mask is not None and attention_mask.shape[-1] != query.shape[1]:
        attention_mask = F.pad(attention_mask, (0, query.shape[1]), value=0.0)
        attention_mask = attention_mask.repeat_interleave(module.heads, dim=0)
    if not _calls_controller(module, query.shape[-2]):
        out = module._memory_efficient_attention_xformers(query, key, value, attention_mask).to(query.dtype)
        return _to_out(module)(out)
    if module.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.baddbmm(torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                       device=query.device),
                           query, key.transpose(-1, -2), beta=0, alpha=module.scale)
    if attention_mask is not None:
        scores = scores + attention_mask
    if module.upcast_softmax:
        scores = scores.float()
    probs = scores.softmax(dim=-1).to(value.dtype)
    rows = probs.shape[0] // module.heads
    probs = controller(probs.view(rows, module.heads, *probs.shape[1:]), is_cross, place)
    probs = probs.reshape(rows * module.heads, *probs.shape[2:])
    out = module.reshape_batch_dim_to_heads(torch.bmm(probs, value))
    return _to_out(module)(out)


# ---------------------------------------------------------------- self-attention (fused, never materialized)

def _self_attention_forward(module, place, controller, kind, settings):
    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, clip_length=None,
                SparseCausalAttention_index=(-1, "first")):
        if module.added_kv_proj_dim is not None or encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError  # as the official SparseCausalAttention
        return _self_attention(module, place, controller, kind, settings, hidden_states, clip_length,
                               SparseCausalAttention_index)
    return forward


def _frames_per_row(batch: int, clip_length: int | None, index_list, device) -> torch.Tensor:
    """(B, R): the key/value rows (frames) each query row attends to, for the whole UNet batch."""
    if clip_length is None:
        return torch.arange(batch, device=device)[:, None]
    if batch % clip_length:
        raise ValueError(f"a batch of {batch} rows is not a whole number of {clip_length}-frame clips")
    local = resolve_frame_index(list(index_list), clip_length).to(device)
    offsets = torch.arange(0, batch, clip_length, device=device)[:, None, None]
    return (local[None] + offsets).reshape(batch, -1)


def _within(kv_frames: torch.Tensor, rows: slice, count: int) -> torch.Tensor:
    """kv_frames of `rows`, re-based to index the same rows of k/v; they must stay inside them."""
    local = kv_frames[rows] - rows.start
    if local.numel() and (int(local.min()) < 0 or int(local.max()) >= count):
        raise ValueError("the controlled half of the batch attends to frames outside it: the batch is not "
                         "[unconditional clip(s), conditional clip(s)]")
    return local


def _self_attention(module, place, controller, kind, settings, hidden_states, clip_length, index_list):
    hidden_states = _group_norm(module, hidden_states)
    q = _split_heads(module, module.to_q(hidden_states))
    k = _split_heads(module, module.to_k(hidden_states))
    v = _split_heads(module, module.to_v(hidden_states))
    batch, tokens = q.shape[0], q.shape[2]
    kv_frames = _frames_per_row(batch, clip_length, index_list, q.device)
    backend = settings["backend"]
    edit = None
    if kind in ("store", "edit") and _calls_controller(module, tokens):
        # what AttentionControl.__call__ does with the map, without the map
        c = controller
        if c.cur_att_layer >= c.num_uncond_att_layers:
            rows = slice(0, batch) if c.LOW_RESOURCE else slice(batch // 2, batch)
            if kind == "store":
                if tokens <= MAX_CONTROLLED_TOKENS and c.save_self_attention:
                    _capture(c, settings).add(c.cur_step, f"{place}_self", q[rows], k[rows],
                                              _within(kv_frames, rows, rows.stop - rows.start), module.scale)
            else:
                edit = _edit_plan(c, place, tokens, rows, kv_frames, q)
        c.cur_att_layer += 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if edit is None:
        ops.blended_attention(q, k, v, kv_frames=kv_frames, scale=module.scale, backend=backend, out=out)
    else:
        rows, source, mask = edit
        for plain in (slice(0, rows.start), slice(rows.stop, batch)):
            if plain.stop > plain.start:
                ops.blended_attention(q[plain], k, v, kv_frames=kv_frames[plain], scale=module.scale,
                                      backend=backend, out=out[plain])
        local = _within(kv_frames, rows, rows.stop - rows.start)
        source = _source_on(source, q, rows.stop - rows.start)
        ops.blended_attention(q[rows], k[rows], v[rows], kv_frames=local, source=source, mask=mask,
                              scale=module.scale, backend=backend, out=out[rows])
    return _to_out(module)(_merge_heads(out))


# ---------------------------------------------------------------- inversion: the side store

class _Capture:
    """Source self-attention of one official AttentionStore, kept as a fatezero_fast store.

    Layers are named '<place>_self/<position>' (position: the order of capture within the step,
    as the official per-key lists); the kv frame rows of each capture are kept beside it.
    """

    def __init__(self, controller, settings):
        placement, folder = settings["placement"], settings["folder"]
        if getattr(controller, "disk_store", False) and getattr(controller, "store_dir", None):
            placement, folder = "disk", Path(controller.store_dir) / "fatezero_fast_self"
        elif placement == "disk" and folder is None:
            folder = tempfile.mkdtemp(prefix="fatezero_fast_self_")
        self.store = make_store(settings["store"], placement=placement, folder=folder, rank=settings["rank"],
                                error_budget=settings["error_budget"])
        self.steps_list = controller.attention_store_all_step  # reset() replaces it: a stale capture
        self.positions: dict[tuple[int, str], int] = {}
        self.kv_frames: dict[tuple[int, str], torch.Tensor] = {}
        self.scales: dict[tuple[int, str], float] = {}
        self.open_step: int | None = None

    def add(self, step: int, key: str, q, k, kv_frames, scale) -> None:
        if self.open_step is not None and step != self.open_step:
            self.store.end_step(self.open_step)
        self.open_step = step
        position = self.positions.get((step, key), 0)
        self.positions[(step, key)] = position + 1
        layer = f"{key}/{position}"
        self.store.capture_self(step, layer, q, k, kv_frames, scale)
        self.kv_frames[(step, layer)] = kv_frames.cpu()
        self.scales[(step, layer)] = float(scale)

    def finish(self) -> None:
        if self.open_step is not None:
            self.store.end_step(self.open_step)
            self.open_step = None

    def source(self, step: int, key: str, position: int):
        """(fused-op source, kv_frames) of that layer, or None when it was not captured."""
        layer = f"{key}/{position}"
        if (step, layer) not in self.kv_frames:
            return None
        self.finish()
        return self.store.self_source(step, layer), self.kv_frames[(step, layer)]


def _capture(controller, settings) -> _Capture:
    capture = getattr(controller, _CAPTURE_ATTR, None)
    if capture is None or capture.steps_list is not controller.attention_store_all_step:
        capture = _Capture(controller, settings)
        setattr(controller, _CAPTURE_ATTR, capture)
    return capture


def _live_capture(store_controller) -> _Capture | None:
    capture = getattr(store_controller, _CAPTURE_ATTR, None)
    if capture is None or capture.steps_list is not store_controller.attention_store_all_step:
        return None
    return capture


def _materialize_into(store_controller) -> None:
    """Put the captured sources into the official store's own self lists, as maps in the
    model's dtype (what its unpatched forward would have stored), for controllers that read them."""
    capture = _live_capture(store_controller)
    order = sorted(capture.kv_frames, key=lambda sl: (sl[0], sl[1].split("/")[0], int(sl[1].split("/")[1])))
    loaded: dict[int, dict] = {}
    for step, layer in order:
        key, position = layer.split("/")[0], int(layer.split("/")[1])
        entry = store_controller.attention_store_all_step[step]
        maps = loaded.setdefault(step, torch.load(entry) if isinstance(entry, str) else entry)
        if len(maps[key]) != position:  # already there
            continue
        source, kv_frames = capture.source(step, key, position)
        probs = source_probs(source, kv_frames, capture.scales[(step, layer)], _map_dtype(source))
        probs = probs.to(source.a.dtype if source.form is SourceForm.QK else torch.float32)
        maps[key].append(probs.cpu() if probs.shape[-2] == MAX_CONTROLLED_TOKENS else probs)
    for step, maps in loaded.items():
        entry = store_controller.attention_store_all_step[step]
        if isinstance(entry, str):
            torch.save(maps, entry)


# ---------------------------------------------------------------- editing: AttentionControlEdit's self semantics

def _step_maps(store_controller, step: int) -> dict:
    maps = store_controller.attention_store_all_step[step]
    return torch.load(maps) if isinstance(maps, str) else maps


def _edit_plan(c, place, tokens, rows, kv_frames, q):
    """AttentionControlEdit.forward for a self-attention map, without the map.

    Returns None (plain attention) or (rows, source, row mask or None) for the fused op.
    """
    if tokens > MAX_CONTROLLED_TOKENS:
        return None
    if c.save_self_attention:
        _warn_once("edit-self-maps", "fatezero_fast: an edit controller with save_self_attention=True does not keep "
                                     "its own self-attention maps under the fused backend")
    key = f"{place}_self"
    position = c.attention_position_counter_dict[key]
    store = c.additional_attention_store
    if c.use_inversion_attention:
        step_in_store = len(store.attention_store_all_step) - c.cur_step - 1
    else:
        step_in_store = c.cur_step
    c.update_attention_position_dict(key)
    if not (c.num_self_replace[0] <= c.cur_step < c.num_self_replace[1]):
        return None
    count = rows.stop - rows.start
    step = step_in_store if step_in_store >= 0 else step_in_store + len(store.attention_store_all_step)
    source = _source(store, step, key, position, _within(kv_frames, rows, count))
    mask = None
    if c.attention_blend is not None:
        h = w = int(math.sqrt(tokens))
        blend = c.attention_blend(target_h=h, target_w=w, attention_store=_step_maps(store, step),
                                  step_in_store=step_in_store)  # (1, frames, h, w): 1 = edit, 0 = source
        if blend.dim() != 4 or blend.shape[0] != 1 or h * w != tokens:
            raise NotImplementedError(f"a self-attention blend mask of shape {tuple(blend.shape)} for {tokens} "
                                      "query tokens is not a per-frame row mask")
        mask = blend[0].reshape(blend.shape[1], h * w).expand(count, h * w).to(q.device, torch.float32)
    return rows, source, mask


def _source(store_controller, step: int, key: str, position: int, kv_frames: torch.Tensor):
    """The fused op's source for (inversion step, key, position): captured Q/K, or the official map."""
    capture = _live_capture(store_controller)
    found = capture.source(step, key, position) if capture is not None else None
    if found is not None:
        source, captured_frames = found
        if not torch.equal(captured_frames, kv_frames.cpu()):
            raise ValueError(f"{key}[{position}]: the edit attends to other frames than the inversion did "
                             "(different clip length or SparseCausalAttention_index)")
        return source
    maps = _step_maps(store_controller, step)[key]
    if position < len(maps):  # maps the official store kept itself (captured without the patch)
        return Source(SourceForm.PROBS, maps[position])
    raise RuntimeError(f"no source self-attention for {key}[{position}] at inversion step {step}: invert with "
                       "store_attention=True (and save_self_attention=True) before editing")


def _source_on(source, q, count: int):
    """A stored source on q's device and dtype, checked to hold `count` frames."""
    moved = {name: None if t is None else t.to(q.device, q.dtype)
             for name, t in (("a", source.a), ("b", source.b), ("row_scale", source.row_scale))}
    if moved["a"].shape[0] != count:
        raise ValueError(f"the source holds {moved['a'].shape[0]} frames, the edited clip {count}")
    return dataclasses.replace(source, **moved)


# ---------------------------------------------------------------- controller-facing API

def source_store(store_controller):
    """The fatezero_fast store (fatezero_fast.stores.AttentionStore: nbytes(), breakdown(), ...)
    holding the self-attention sources captured for an official AttentionStore, or None."""
    capture = _live_capture(store_controller)
    return None if capture is None else capture.store


def self_source(store_controller, step: int, key: str, position: int):
    """The fused op's `source` for one captured layer: key is '<down|mid|up>_self', position its
    index among that key's layers within the step (the official attention_store_all_step[step][key][position])."""
    capture = _live_capture(store_controller)
    found = capture.source(step, key, position) if capture is not None else None
    if found is None:
        raise KeyError(f"no captured self-attention {key}[{position}] at step {step}")
    return found[0]


def self_attention_probs(store_controller, step: int, key: str, position: int) -> torch.Tensor:
    """The materialized source map (frames, heads, Nq, Nk; fp32) of one captured layer, as the
    official store would hold it (for code that needs the map itself, e.g. visualization)."""
    capture = _live_capture(store_controller)
    found = capture.source(step, key, position) if capture is not None else None
    if found is None:
        raise KeyError(f"no captured self-attention {key}[{position}] at step {step}")
    source, kv_frames = found
    return source_probs(source, kv_frames, capture.scales[(step, f"{key}/{position}")], _map_dtype(source))


def _map_dtype(source) -> torch.dtype:
    """fp32, or fp64 for an fp64 source: the precision a materialized map is computed in."""
    return torch.float64 if source.a.dtype == torch.float64 else torch.float32
