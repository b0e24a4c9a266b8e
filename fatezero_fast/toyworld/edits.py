"""The toy world's standard edits: the target prompt (the caption of the edited scene) and FateZero's
options for each kind of edit. The demo, the quality benchmark and the CI floor test share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import world

# a far colour for each colour (attribute edits)
COLOUR_EDIT = {"red": "blue", "blue": "red", "green": "purple", "yellow": "blue", "white": "red",
               "black": "yellow", "orange": "blue", "purple": "yellow"}
SHAPE_EDIT = {"car": "ball", "ball": "box", "box": "ball", "boat": "ball"}

# classifier-free guidance: SD's 7.5 (at 2-5 the toy model keeps the inverted colour, docs/toyworld/MODEL_CARD.md)
GUIDANCE = 7.5
# blend-mask threshold: the toy model's mask level is 6x6 (one cell = 8x8 pixels); at FateZero's usual 0.3
# its blend masks cover the frame, at 0.85 they cover the object grown by the mask's 3x3 max-pool
BLEND_TH = (0.85, 0.85)

# FateZero's options (the official config keys) for each kind of edit on the toy model
OPTIONS = {
    # local attribute: cross-attention refine, self-attention blended inside the object's mask
    "attribute": dict(cross_replace_steps=0.8, self_replace_steps=0.8, blend_self_attention=True,
                      blend_th=BLEND_TH, guidance_scale=GUIDANCE),
    # global/style: no blend words; source self-attention keeps the layout
    "style": dict(cross_replace_steps=0.8, self_replace_steps=0.6, guidance_scale=GUIDANCE),
    # shape: short cross-attention replacement, blended self-attention and latent blend
    "shape": dict(cross_replace_steps=0.2, self_replace_steps=0.5, blend_self_attention=True, blend_latents=True,
                  blend_th=BLEND_TH, guidance_scale=GUIDANCE),
    # same prompt: the reconstruction
    "reconstruct": dict(cross_replace_steps=1.0, self_replace_steps=1.0, guidance_scale=GUIDANCE),
    # the paper's ablation: plain DDIM inversion, then regeneration with the target prompt
    "no_fusion": dict(cross_replace_steps=0.0, self_replace_steps=0.0, guidance_scale=GUIDANCE),
}


@dataclass
class Edit:
    """One edit of a clip: its name, the target scene and prompt, and the pipeline options."""

    name: str
    kind: str                 # attribute | style | shape | reconstruct
    target: world.Scene
    prompt: str
    options: dict = field(default_factory=dict)
    target_colour: str | None = None
    target_kind: str | None = None


def attribute(scene: world.Scene, colour: str | None = None, **overrides) -> Edit:
    """Recolour the object: "a red car ..." -> "a blue car ...", blend word = the object."""
    colour = colour or COLOUR_EDIT[scene.colour]
    target = scene.with_(colour=colour)
    options = dict(OPTIONS["attribute"], blend_words=[[scene.kind], [scene.kind]], **overrides)
    return Edit(f"{scene.colour}->{colour}", "attribute", target, world.caption(target), options, target_colour=colour)


def style(scene: world.Scene, sky: str = "night", **overrides) -> Edit:
    """A global change the world supports: the same scene at night (or under another sky)."""
    target = scene.with_(sky=sky)
    return Edit(f"{scene.sky}->{sky}", "style", target, world.caption(target), dict(OPTIONS["style"], **overrides))


def shape(scene: world.Scene, kind: str | None = None, **overrides) -> Edit:
    """Change the object's kind: "a red car driving ..." -> "a red ball rolling ...", with latent blend."""
    kind = kind or SHAPE_EDIT[scene.kind]
    motion = scene.motion if (kind, scene.motion) in world.VERBS else "crossing"
    target = scene.with_(kind=kind, motion=motion)
    options = dict(OPTIONS["shape"], blend_words=[[scene.kind], [kind]], **overrides)
    return Edit(f"{scene.kind}->{kind}", "shape", target, world.caption(target), options, target_kind=kind)


def reconstruct(scene: world.Scene) -> Edit:
    return Edit("reconstruction", "reconstruct", scene, world.caption(scene), dict(OPTIONS["reconstruct"]))


def no_fusion(edit: Edit) -> Edit:
    """The same edit without attention fusion or blending (plain inversion + regeneration)."""
    return Edit(edit.name + " (no fusion)", edit.kind, edit.target, edit.prompt, dict(OPTIONS["no_fusion"]),
                edit.target_colour, edit.target_kind)
