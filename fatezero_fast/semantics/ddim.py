"""DDIM inversion's update, as the official code computes it (docs/semantics.md §2)."""
from __future__ import annotations

import torch


def ddim_inversion_step(eps: torch.Tensor, timestep: int, latent: torch.Tensor, alphas_cumprod: torch.Tensor,
                        final_alpha_cumprod: torch.Tensor, num_train_timesteps: int,
                        num_inference_steps: int) -> torch.Tensor:
    """One DDIM inversion step z_i -> z_{i+1} at `timestep`, as the official code computes it.

    z_{i+1} = sqrt(a_next) (z_i - sqrt(1 - a_cur) eps) / sqrt(a_cur) + sqrt(1 - a_next) eps,
    a_next = alphas_cumprod[t], a_cur = alphas_cumprod[t - 1000/T] (final_alpha_cumprod when negative).
    """
    t = int(timestep)
    prev_t = min(t - num_train_timesteps // num_inference_steps, num_train_timesteps - 1)
    a_cur = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    a_next = alphas_cumprod[t]
    x0 = (latent - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
    return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps


def epsilon_from_v(v: torch.Tensor, sample: torch.Tensor, alpha_cumprod_t: torch.Tensor) -> torch.Tensor:
    """A v-prediction UNet's output at timestep t as the noise it implies: eps = sqrt(a_t) v + sqrt(1 - a_t) x_t.

    v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 and x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Salimans & Ho
    2022); a_t = alphas_cumprod[t] of the timestep the UNet was given, in inversion too, so that
    inversion and editing evaluate the same function of the latent.
    """
    a = alpha_cumprod_t.to(torch.promote_types(v.dtype, torch.float32))
    return (a ** 0.5 * v + (1 - a) ** 0.5 * sample).to(v.dtype)
