"""FateZero's attention control for your own denoising loop on current diffusers.

For FateZero code that has its own inversion and editing loops (ports of the official code to
newer diffusers): install the spatio-temporal processors on any UNet2DConditionModel and wrap
each UNet call in a step of this controller. Options carry the official config names.

    ctl = FateZeroController(unet, tokenizer, source_prompt, num_inference_steps=50,
                             SparseCausalAttention_index=[-1, "first"], store="qk")
    for i, t in enumerate(reversed(timesteps)):            # DDIM inversion z_0 -> z_T
        with ctl.inversion_step(i, z):                      # batch: the clip's F frames, source prompt
            eps = unet(z, t, encoder_hidden_states=source_embeddings).sample
        z = <your DDIM inversion step>
    ctl.set_edit(target_prompt, cross_replace_steps=0.8, self_replace_steps=0.6,
                 blend_words=[["jeep"], ["car"]], blend_self_attention=True, blend_latents=True)
    for j, t in enumerate(timesteps):
        with ctl.edit_step(j, z):                           # batch: [uncond, target], F frames each
            eps = unet(torch.cat([z, z]), t, encoder_hidden_states=embeddings).sample
        z = scheduler.step(<guided eps>, t, z).prev_sample
        z = ctl.blend_latents(j, z, inverted[T - j])        # inverted[k] = z_k, inverted[0] = z_0

The edited (target) branch must be the last of the batch. With store="recompute" nothing is
kept per layer, and at the steps where `ctl.uses_source(j)` the batch must start with the source
branch: the inversion latent z_{T-1-j} with the source prompt ([source, uncond, target]).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..errors import InputError
from ..semantics.frames import IndexEntry
from ..semantics.masks import blend_latents, latent_blend_mask, self_blend_mask
from ..semantics.plan import EditOptions, EditPlan
from ..stores import AttentionStore, make_store
from ..unet.levels import CONTROL_LIMIT
from ..unet.processors import FateZeroState, VideoAttentionConfig, install


class FateZeroController:
    """Installs FateZero's processors on `unet` and tells them what each UNet call is.

    The one implementation of per-step control: FateZeroPipeline runs its loops through it too.
    """

    def __init__(self, unet, tokenizer, source_prompt: str, num_inference_steps: int, *,
                 SparseCausalAttention_index: Sequence[IndexEntry] = (-1, "first"),  # the official name
                 least_sc_channel: int | None = None, store: str | AttentionStore = "qk",
                 max_control_tokens: int = CONTROL_LIMIT, backend: str = "auto"):
        config = VideoAttentionConfig(sparse_causal_index=SparseCausalAttention_index,
                                      least_sc_channel=least_sc_channel, max_control_tokens=max_control_tokens,
                                      backend=backend)
        self._attach(install(unet, config), tokenizer, source_prompt, num_inference_steps, store, {})

    @classmethod
    def for_state(cls, state: FateZeroState, tokenizer, source_prompt: str, num_inference_steps: int,
                  store: str | AttentionStore, token_maps=None) -> "FateZeroController":
        """A controller over processors already installed (`state`), e.g. to edit a saved inversion:
        token_maps[i] are inversion step i's mask-level maps (a tensor, or per-step files)."""
        ctl = cls.__new__(cls)
        ctl._attach(state, tokenizer, source_prompt, num_inference_steps, store, {} if token_maps is None else token_maps)
        return ctl

    def _attach(self, state, tokenizer, source_prompt, num_steps, store, token_maps) -> None:
        if num_steps <= 0:
            raise InputError(f"num_inference_steps must be positive, got {num_steps}")
        self.state = state
        self.tokenizer, self.source_prompt, self.num_steps = tokenizer, source_prompt, num_steps
        self.store = make_store(store) if isinstance(store, str) else store
        self.token_maps = token_maps  # inversion step -> (F, rh, rw, 77) mask-level maps
        self.plan: EditPlan | None = None
        self._edit_maps_sum: torch.Tensor | None = None

    @contextlib.contextmanager
    def _call(self, mode: str, latents: torch.Tensor, **kwargs):
        size = tuple(latents.shape[-2:])
        self.state.begin_call(mode, latents.shape[0], size, store=self.store, **kwargs)
        try:
            yield
        finally:
            self.state.begin_call("plain", 1, size)

    @contextlib.contextmanager
    def inversion_step(self, i: int, latents: torch.Tensor):
        """Around the UNet call of inversion step i (0 = from z_0) on latents (F, C, h, w)."""
        self._check_step(i)
        with self._call("invert", latents, capture_branch=0, store_step=i):
            yield
            self.token_maps[i] = self.state.captured_token_maps()
        self.store.end_step(i)

    def set_edit(self, target_prompt: str, options: EditOptions | None = None, **option_kwargs) -> EditPlan:
        """Start an edit: options as in the official p2p_config (fatezero_fast.EditOptions), given as an
        EditOptions or by name."""
        missing = [i for i in range(self.num_steps) if i not in self.token_maps] \
            if isinstance(self.token_maps, dict) else list(range(len(self.token_maps), self.num_steps))
        if missing:
            raise InputError(f"inversion steps {missing[:5]}{'...' if len(missing) > 5 else ''} have not run: "
                             f"run all {self.num_steps} inversion steps before editing")
        options = options or EditOptions(**option_kwargs)
        self.plan = EditPlan.build(options, self.source_prompt, target_prompt, self.num_steps, self.tokenizer)
        self._edit_maps_sum = None
        return self.plan

    def uses_source(self, j: int) -> bool:
        """recompute store: must edit step j's batch start with the source branch?"""
        return self._edit_plan().uses_source(j) and self.store.recompute

    def source_maps(self, j: int, device=None) -> torch.Tensor:
        """The inversion's mask-level maps that edit step j fuses (those of inversion step T-1-j)."""
        return self.token_maps[self.num_steps - 1 - j].to(device)

    @contextlib.contextmanager
    def edit_step(self, j: int, latents: torch.Tensor):
        """Around the UNet call of edit step j (0 = from z_T); latents (F, C, h, w) of one branch."""
        plan = self._edit_plan()
        self._check_step(j)
        with self._call("edit", latents, plan=plan, step=j, store_step=self.num_steps - 1 - j,
                        source_token_maps=self.source_maps(j, latents.device),
                        capture_branch=-1 if plan.blend_latents else None):
            yield
            if plan.blend_latents:
                captured = self.state.captured_token_maps()
                self._edit_maps_sum = captured if self._edit_maps_sum is None else self._edit_maps_sum + captured

    def self_blend_mask(self, j: int, size: tuple[int, int], device=None) -> torch.Tensor | None:
        """(F, h*w) self-attention blend mask of edit step j at `size` (§7); None: no blending."""
        return self_blend_mask(self._edit_plan(), self.source_maps(j, device), size)

    def latent_blend_mask(self, j: int, size: tuple[int, int], device=None) -> torch.Tensor | None:
        """(F, h, w) latent blend mask after edit step j (§8); None outside its window or without blending."""
        plan = self._edit_plan()
        if not plan.blend_latents or self._edit_maps_sum is None:
            return None
        return latent_blend_mask(plan, j, self.source_maps(j, device), self._edit_maps_sum, size)

    def blend_latents(self, j: int, latents: torch.Tensor, inverted: torch.Tensor) -> torch.Tensor:
        """§8 after edit step j: `inverted` (the inversion latent z_{T-j}) outside the blend mask, the
        edited latents inside; unchanged outside the mask's step window."""
        mask = self.latent_blend_mask(j, tuple(latents.shape[-2:]), latents.device)
        return latents if mask is None else blend_latents(latents, inverted, mask)

    def _edit_plan(self) -> EditPlan:
        if self.plan is None:
            raise InputError("no edit set: call set_edit(target_prompt, ...) first")
        return self.plan

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise InputError(f"step {step} is outside the {self.num_steps} steps of this controller")
