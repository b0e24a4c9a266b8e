"""FateZeroPipeline: DDIM inversion with the source prompt, then edits that fuse its attention.

One inversion serves any number of edits (docs/semantics.md §2, §4). The source attention is
not stored: each editing step re-evaluates the source branch on the stored inversion latent
with the source prompt in the same UNet batch as the edit ("recompute"), which is the very
computation that produced the inversion maps; it runs only as far into the UNet, and at only
the steps, that the fusion needs (unet/source_exit.py). Only the latents and, per step,
the head- and layer-averaged 16x16 cross maps needed by the blend masks are kept.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.loading import load_components
from ..semantics.ddim import ddim_inversion_step, epsilon_from_v
from ..semantics.masks import blend_latents
from ..semantics.plan import EditOptions
from ..semantics.tokens import fit_prompt
from ..stores import AttentionStore
from ..unet.chunk_size import auto_chunk_size
from ..unet.processors import VideoAttentionConfig, install
from ..unet.runner import streaming_unet
from ..unet.shard import FrameShard, shard_from_env
from ..unet.source_exit import drop_source_branch, source_exit_block
from .controller import FateZeroController
from .inversion import Inversion
from .run_config import RunConfig, check_edit, check_steps
from .steps import new_steps

def _checked_run(run: RunConfig | None, **changes) -> RunConfig:
    """The pipeline's run configuration: `run` (default: fp32) with the keyword overrides, checked."""
    return (run or RunConfig(dtype="fp32")).with_(**changes)


def _with_checked_run(kwargs: dict) -> dict:
    """Constructor keywords with their run configuration built, so that it is checked first."""
    changes = {k: kwargs.pop(k) for k in ("attention", "device", "dtype", "chunk_size") if k in kwargs}
    return dict(kwargs, run=_checked_run(kwargs.pop("run", None), **changes))


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@dataclass
class EditResult:
    target_prompt: str
    latents: torch.Tensor                      # (F, 4, h, w) final latents
    frames: torch.Tensor | None                # (F, 3, H, W) in [-1, 1], when decoded
    masks: dict = field(default_factory=dict)  # name -> (steps, F, h, w) blend masks used


class FateZeroPipeline:
    """Stable Diffusion components made into FateZero's video model (see `processors.install`)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, *, run: RunConfig | None = None,
                 attention: VideoAttentionConfig | None = None, device=None, dtype=None,
                 chunk_size: int | str | None = None):
        """`run` says how to run (edit.run_config); attention, device, dtype (default fp32) and
        chunk_size, when given, override its fields."""
        self.run = _checked_run(run, attention=attention, device=device, dtype=dtype, chunk_size=chunk_size)
        self.device, self.dtype = self.run.device, self.run.dtype
        self._auto_chunks: dict[tuple, int | None] = {}
        with _quiet_diffusers():  # its dtype-cast notice is not about anything the user did
            self.vae = vae.to(self.device, self.dtype).eval()
            self.unet = unet.to(self.device, self.dtype).eval()
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval()
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.model_format = None  # what from_pretrained detected (fatezero_fast.models.formats)
        # the UNet predicts epsilon or v (SD 2.x); the steps take epsilon (fatezero_fast.semantics.ddim)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"prediction_type {self.prediction_type!r} is not supported: use epsilon or v_prediction")
        self.state = install(self.unet, self.run.attention)
        self.shard: FrameShard | None = None  # frames split over ranks (distribute)

    def distribute(self, group=None) -> bool:
        """Split every UNet call's frames over the ranks of `group` (default: the default process
        group, initialised from torchrun's environment when it is not yet). Every rank runs the same
        calls on the same inputs and gets the same results; only rank 0 shows progress and decodes.
        Returns False (nothing changes) in a single process."""
        self.shard = shard_from_env(group)
        return self.shard is not None

    def _shows_progress(self, progress: bool) -> bool:
        return progress and (self.shard is None or self.shard.rank == 0)

    @property
    def chunk_size(self) -> int | str | None:
        """Frames per branch that go through the UNet at once (unet/runner.py); None: all at once;
        "auto": chosen per call shape from the free GPU memory (unet/chunk_size.py)."""
        return self.run.chunk_size

    # -- construction
    @classmethod
    def from_pretrained(cls, folder: str | Path, *, lora: int | None = None, **kwargs) -> "FateZeroPipeline":
        """Load a local diffusers-format folder (vae, text_encoder, tokenizer, unet, scheduler).

        The UNet may be plain SD 1.x/2.x, a FateZero tuned model or a Tune-A-Video model
        (fatezero_fast.models.formats); `lora` is the LoRA rank of the run's model_config, checked
        against the weights. A Tune-A-Video model attends to the frames it was tuned with (first and
        previous) unless `attention` (or `run`) says otherwise."""
        attention_given = kwargs.get("attention") is not None or kwargs.get("run") is not None
        kwargs = _with_checked_run(kwargs)  # bad options fail before anything is loaded
        parts, fmt = load_components(folder, lora)
        if not attention_given:
            kwargs["run"] = kwargs["run"].with_(attention=VideoAttentionConfig(sparse_causal_index=fmt.native_index))
        pipe = cls(**parts, **kwargs)
        pipe.model_format = fmt
        return pipe

    @classmethod
    def tiny_random(cls, seed: int = 0, **kwargs) -> "FateZeroPipeline":
        """The embedded default: a small random-weight model of SD's architecture (outputs are noise-like)."""
        from ..models import random_components

        kwargs = _with_checked_run(kwargs)  # bad options fail before the model is built
        return cls(**random_components("tiny", seed), **kwargs)

    # -- building blocks
    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                     chunk: int = 8) -> torch.Tensor:
        """(F, 3, H, W) in [-1, 1] -> (F, 4, H/8, W/8) latents (posterior sample times the VAE scale).

        The clip stays where it is: `chunk` frames at a time go to the device. Distributed, each rank
        encodes its own frames and the latents are all-gathered; the posterior's noise is drawn for
        every chunk of the clip, in the order one process draws it, so it does not depend on the ranks."""
        from diffusers.utils.torch_utils import randn_tensor

        num_frames, (height, width) = len(frames), frames.shape[-2:]
        lo, hi = (0, num_frames) if self.shard is None else self.shard.frames(num_frames)
        latents = torch.empty((num_frames, self.vae.config.latent_channels, height // self.vae_scale,
                               width // self.vae_scale), device=self.device, dtype=self.dtype)
        for i in range(0, num_frames, chunk):
            # the noise of frames [i, i + chunk), as DiagonalGaussianDistribution.sample draws it
            noise = randn_tensor(latents[i:i + chunk].shape, generator=generator, device=self.device, dtype=self.dtype)
            a, e = max(i, lo), min(i + chunk, hi)
            if a < e:
                posterior = self.vae.encode(frames[a:e].to(self.device, self.dtype)).latent_dist
                latents[a:e] = posterior.mean + posterior.std * noise[a - i:e - i]
        if self.shard is not None:
            self.shard.share_frames_(latents, 0)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(F, 4, h, w) -> (F, 3, H, W) fp32 frames in [-1, 1] on the CPU, `chunk` frames at a time."""
        latents = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor
        frames = None
        for i in range(0, len(latents), chunk):
            x = self.vae.decode(latents[i:i + chunk]).sample.float().clamp(-1, 1).cpu()
            if frames is None:
                frames = torch.empty((len(latents),) + tuple(x.shape[1:]))
            frames[i:i + len(x)] = x
        return frames

    def _timesteps(self, num_inference_steps: int):
        check_steps(num_inference_steps)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.register_to_config(prediction_type="epsilon")  # the steps are given epsilon
        scheduler.set_timesteps(num_inference_steps)
        return scheduler, scheduler.timesteps

    def _unet(self, branches: list[torch.Tensor], embeddings: list[torch.Tensor], t,
              chunk_size: int | None = None, progress: bool = False,
              drop_first_branch_at: int | None = None) -> torch.Tensor:
        """One UNet call on branches of F frames each, branch b conditioned on embeddings[b].

        With chunk_size, the call runs layer-major over chunks of that many frames per branch
        (unet/runner.py): the same result, device memory bounded by the chunk; `progress`
        shows a bar over the chunks of the call when there are several. With drop_first_branch_at
        = i, branch 0 leaves the batch before up_blocks[i] and is not in the output
        (unet/source_exit.py)."""
        f = branches[0].shape[0]
        if chunk_size == "auto":
            chunk_size = self.auto_chunk_size(f, len(branches), tuple(branches[0].shape[-2:]))
        sample = torch.cat(branches).to(self.device, self.dtype)
        context = torch.cat([e.expand(f, -1, -1) for e in embeddings])
        if self.shard is not None:  # a rank runs its frames layer-major and exchanges the couplings
            return streaming_unet(self.unet, sample, t, context, num_frames=f, chunk_size=chunk_size or f,
                                  state=self.state, progress=self._shows_progress(progress) and (chunk_size or f) < f,
                                  drop_first_branch_at=drop_first_branch_at, shard=self.shard)
        if chunk_size is None:
            with drop_source_branch(self.unet, self.state, drop_first_branch_at):
                return self.unet(sample, t, encoder_hidden_states=context).sample
        return streaming_unet(self.unet, sample, t, context, num_frames=f, chunk_size=chunk_size, state=self.state,
                              progress=progress and chunk_size < f, drop_first_branch_at=drop_first_branch_at)

    def _epsilon(self, output: torch.Tensor, sample: torch.Tensor, t, scheduler) -> torch.Tensor:
        """The UNet's output at timestep t as epsilon (a v-prediction model's v converted; same rows as sample)."""
        if self.prediction_type == "epsilon":
            return output
        return epsilon_from_v(output, sample, scheduler.alphas_cumprod[int(t)].to(output.device))

    def auto_chunk_size(self, frames: int, branches: int, latent_size: tuple[int, int]) -> int | None:
        """What chunk_size="auto" runs a UNet call of this shape with (chosen once per shape)."""
        key = (frames, branches, tuple(latent_size))
        if key not in self._auto_chunks:
            self._auto_chunks[key] = auto_chunk_size(self.unet.config, self.device, self.dtype, frames, branches,
                                                     latent_size)
        return self._auto_chunks[key]

    # -- the two phases
    @torch.no_grad()
    def invert(self, video: torch.Tensor | None = None, source_prompt: str = "", num_inference_steps: int = 50,
               *, latents: torch.Tensor | None = None, seed: int = 0, store: AttentionStore | str | None = None,
               progress: bool = True, chunk_size: int | str | None = None,
               latents_dtype: str | torch.dtype | None = None, latents_folder: str | Path | None = None,
               store_folder: str | Path | None = None) -> Inversion:
        """DDIM-invert a clip (F, 3, H, W) in [-1, 1] (or its latents (F, 4, h, w)) with the source prompt.

        `store` keeps the source attention for the edits: an AttentionStore, or a form name of
        stores.FORMS made as the run config says (default: its form; a disk store in `store_folder`).
        `chunk_size` (default: the pipeline's) runs the UNet over that many frames at a time,
        exactly (unet/runner.py); "auto" picks it from the free GPU memory. The latents of every step are kept in `latents_dtype`
        (default: the model's, exactly what the steps computed; "fp16" halves an fp32 model's), in
        host memory or, with `latents_folder`, one file per step there (read back a step at a time),
        and so are the source token maps of the mask level (in its token_maps/).
        """
        run = self.run.with_(chunk_size=chunk_size, latents_dtype=latents_dtype,
                             store=store if isinstance(store, str) else None,
                             latents_placement="disk" if latents_folder is not None else None)
        chunk_size, keep_dtype = run.chunk_size, run.keep_dtype
        if (video is None) == (latents is None):
            raise InputError("give exactly one of video= or latents= to invert")
        source_prompt = fit_prompt(source_prompt, self.tokenizer, "source")
        scheduler, timesteps = self._timesteps(num_inference_steps)
        store = run.make_store(store_folder) if store is None or isinstance(store, str) else store
        if self.shard is not None and store.placement == "disk" and not store.recompute:
            raise InputError("a disk store cannot be kept over several ranks: use --store-placement host (rank 0 "
                             "saves the gathered store) or --store recompute")
        if latents is None:
            generator = torch.Generator(self.device).manual_seed(seed)
            latents = self.encode_video(video, generator)
        z = latents.to(self.device, self.dtype)
        cond = self.encode_prompt(source_prompt)
        steps = len(timesteps)
        ctl = FateZeroController.for_state(self.state, self.tokenizer, source_prompt, steps, store)
        kept = new_steps((steps + 1,) + tuple(z.shape), keep_dtype, latents_folder)
        kept[0] = z.cpu()
        token_maps = None
        for i in tqdm(range(steps), desc="inversion", disable=not self._shows_progress(progress)):
            t = timesteps[steps - 1 - i]
            with ctl.inversion_step(i, z):
                eps = self._epsilon(self._unet([z], [cond], t, chunk_size, progress), z, t, scheduler)
            maps = ctl.token_maps.pop(i).cpu()
            if token_maps is None:  # kept where the latents are
                token_maps = new_steps((steps,) + tuple(maps.shape), maps.dtype,
                                       None if latents_folder is None else Path(latents_folder) / "token_maps")
            token_maps[i] = maps
            z = ddim_inversion_step(eps, t, z, scheduler.alphas_cumprod.to(self.device),
                                    scheduler.final_alpha_cumprod.to(self.device),
                                    scheduler.config.num_train_timesteps, steps).to(self.dtype)
            kept[i + 1] = z.cpu()
        if self.shard is not None:  # each rank captured its frames: the store becomes the whole clip's
            ctl.store.gather_(self.shard, z.shape[0])
        return Inversion(source_prompt, steps, kept, token_maps,
                         copy.deepcopy(self.state.config), ctl.store, None if video is None else video.float().cpu())

    @torch.no_grad()
    def edit(self, inversion: Inversion, target_prompt: str, options: EditOptions | None = None, *,
             decode: bool = True, progress: bool = True, chunk_size: int | None = None,
             **option_kwargs) -> EditResult:
        """Denoise from the inversion with the target prompt, fusing the source attention (docs/semantics.md §4-§8).

        `chunk_size` (default: the pipeline's) runs the UNet over that many frames at a time, exactly."""
        chunk_size = self.run.with_(chunk_size=chunk_size).chunk_size
        options = options or EditOptions(**option_kwargs)
        target_prompt = check_edit(target_prompt, options, self.tokenizer)
        steps = inversion.num_inference_steps
        scheduler, timesteps = self._timesteps(steps)
        ctl = FateZeroController.for_state(self.state, self.tokenizer, inversion.source_prompt, steps,
                                           inversion.store, inversion.token_maps)
        plan = ctl.set_edit(target_prompt, options)
        src_cond, tgt_cond = self.encode_prompt(inversion.source_prompt), self.encode_prompt(target_prompt)
        cfg = options.guidance_scale != 1
        uncond = self.encode_prompt("") if cfg else None
        z = inversion.latent(steps, self.device, self.dtype)
        f, latent_size = z.shape[0], tuple(z.shape[-2:])
        # Chunked, the unconditional branch runs in a layer-major pass of its own: its attention and
        # GroupNorm statistics involve no other branch, so the host keeps fewer branches' activations.
        joint = 2 + inversion.store.recompute
        separate_uncond = cfg and chunk_size is not None and \
            (chunk_size != "auto" or self.auto_chunk_size(f, joint, latent_size) is not None)
        edit_embeddings = ([uncond] if cfg and not separate_uncond else []) + [tgt_cond]  # [(uncond,) target]
        masks = {"self_attention": [], "latents": []}
        for j, t in enumerate(tqdm(timesteps, desc=f"edit: {target_prompt[:40]}",
                                   disable=not self._shows_progress(progress))):
            if separate_uncond:
                self.state.begin_call("plain", f, latent_size)
                eps_uncond = self._unet([z], [uncond], t, chunk_size, progress)
            # recompute: the source branch goes first, at the steps that fuse it (unet/source_exit.py)
            with_source = ctl.uses_source(j)
            embeddings = ([src_cond] if with_source else []) + edit_embeddings
            branches = [z] * len(embeddings)
            if with_source:
                branches[0] = inversion.latent(steps - 1 - j, self.device, self.dtype)
            with ctl.edit_step(j, z):
                exit_block = source_exit_block(self.unet, self.state) if with_source else None
                eps = self._unet(branches, embeddings, t, chunk_size, progress, exit_block)
            eps_edit = self._epsilon(eps[-f:], z, t, scheduler)
            if cfg:
                eps_uncond = self._epsilon(eps_uncond if separate_uncond else eps[-2 * f:-f], z, t, scheduler)
                eps_edit = eps_uncond + options.guidance_scale * (eps_edit - eps_uncond)
            z = scheduler.step(eps_edit, t, z).prev_sample.to(self.dtype)
            if plan.blend_self_attention and plan.replaces_self(j):
                masks["self_attention"].append(ctl.self_blend_mask(j, latent_size, self.device).view(f, *latent_size))
            mask = ctl.latent_blend_mask(j, latent_size, self.device)
            if mask is not None:
                z = blend_latents(z, inversion.latent(steps - j, self.device, self.dtype), mask)
                masks["latents"].append(mask.float())
        self.state.begin_call("plain", 1, latent_size)
        masks = {k: torch.stack(v).cpu() for k, v in masks.items() if v}
        frames = self.decode_latents(z) if decode and (self.shard is None or self.shard.rank == 0) else None
        return EditResult(target_prompt, z.cpu(), frames, masks)
