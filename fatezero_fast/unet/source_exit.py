"""How much of the UNet the recompute store's source branch has to run in an edit step.

With the recompute store an edit step's UNet batch is [source, (uncond,) target]: the source
branch re-evaluates inversion on the stored latent with the source prompt, and only the fusion of
the controlled layers reads it (their self-attention Q/K, docs/semantics.md §6, and cross maps, item
5). Its noise prediction is discarded. So the pipeline

- leaves it out of the batch at steps that fuse nothing (`EditPlan.uses_source`: outside the
  self-attention window and with every cross alpha 0), and otherwise
- drops it before the first up block that has no controlled layer after it: for SD-1.x at
  512x512 that is up_blocks[3] (the 64x64 level, never controlled by default) and the output head,
  about a quarter of a UNet pass.

Both are exact: no value the target branch sees changes.
"""
from __future__ import annotations

import contextlib

from .levels import up_block_tokens
from .processors import FateZeroState


def source_exit_block(unet, state: FateZeroState) -> int | None:
    """Index of the first up block from which no layer needs the source branch (None: the last
    block still needs it, nothing to drop). Call after `state.begin_call("edit", ...)`."""
    needed = [i for i, (block, tokens) in enumerate(zip(unet.up_blocks, up_block_tokens(unet, state.latent_size)))
              if getattr(block, "attentions", None) and state.controls(tokens)]
    first = needed[-1] + 1 if needed else 0
    return first if first < len(unet.up_blocks) else None


@contextlib.contextmanager
def drop_source_branch(unet, state: FateZeroState, block: int | None):
    """Within a stock `unet(...)` call, drop branch 0 from the batch before up_blocks[block].

    Pre-hooks on that block and the ones after it slice the first branch's rows off every
    batch-sized input (hidden states, skip activations, time embedding, text embedding); the
    output head then runs on the smaller batch, and the call returns the other branches only.
    """
    if block is None:
        yield
        return
    rows = state.num_frames
    full = None  # the batch's row count, seen at the first hooked block

    def hook(module, args, kwargs):
        nonlocal full
        if args or "hidden_states" not in kwargs:
            raise NotImplementedError("dropping the source branch needs a UNet that calls its up blocks "
                                      "with keyword arguments (diffusers >= 0.20)")
        sample = kwargs["hidden_states"]
        if full is None:
            full = sample.shape[0]
            state.drop_first_branch()

        def cut(x):
            if x is None or not hasattr(x, "shape") or x.shape[0] != full:
                return x
            return x[rows:]

        kwargs = {name: tuple(cut(x) for x in value) if isinstance(value, tuple) else cut(value)
                  for name, value in kwargs.items()}
        return args, kwargs

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in list(unet.up_blocks)[block:]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
