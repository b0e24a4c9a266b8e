"""A deterministic synthetic world of short captioned clips, with ground-truth object masks.

Scenes: a sky (blue, orange, grey, or night) over a textured ground (grass, road, sea, sand) with a
horizon; one object (car, ball, boat, box) in one colour of PALETTE; one motion (a camera pan, the
object crossing the frame, or a bounce). `caption` describes a scene with real CLIP vocabulary
words only, e.g. "a red car driving on a road under a blue sky". `render` returns the frames and
the ground-truth masks of the object and of its body (the pixels painted in the object's colour);
the masks are for evaluation only, never given to the editing method.

Everything is a pure function of a seed (numpy's PCG64): `sample_scene(seed)` then `render(scene)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SIZE = 48  # default frame side (pixels); the toy model works at 48x48 (see docs/toyworld/MODEL_CARD.md)

PALETTE = {  # object colours (RGB); the names are the caption words
    "red": (215, 35, 35),
    "blue": (35, 70, 225),
    "green": (40, 175, 50),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "orange": (250, 135, 20),
    "purple": (135, 40, 185),
}
KINDS = ("car", "ball", "boat", "box")
GROUNDS = {  # name -> (base RGB, caption phrase)
    "grass": ((70, 150, 55), "the grass"),
    "road": ((88, 88, 94), "a road"),
    "sea": ((35, 95, 175), "the sea"),
    "sand": ((214, 188, 128), "the sand"),
}
SKIES = {  # name -> (top RGB, bottom RGB)
    "blue": ((70, 130, 215), (175, 210, 245)),
    "orange": ((235, 110, 60), (250, 200, 120)),
    "grey": ((120, 125, 135), (185, 188, 195)),
    "night": ((8, 12, 40), (30, 40, 85)),
}
MOTIONS = ("pan", "crossing", "bounce")
NIGHT_LIGHT = (0.38, 0.42, 0.62)  # what night does to the ground and the object (a blue-ish dark)

# which kinds go on which ground, and move how
KIND_GROUNDS = {"car": ("road", "grass", "sand"), "ball": ("grass", "road", "sand"),
                "boat": ("sea",), "box": ("grass", "road", "sand")}
KIND_MOTIONS = {"car": ("crossing", "pan"), "ball": ("crossing", "bounce", "pan"),
                "boat": ("crossing", "pan"), "box": ("crossing", "bounce", "pan")}
VERBS = {("car", "crossing"): "driving", ("car", "pan"): "driving", ("ball", "crossing"): "rolling",
         ("ball", "pan"): "rolling", ("ball", "bounce"): "bouncing", ("boat", "crossing"): "sailing",
         ("boat", "pan"): "sailing", ("box", "crossing"): "sliding", ("box", "pan"): "sliding",
         ("box", "bounce"): "bouncing"}

WINDOW = (165, 205, 235)
WHEEL = (22, 22, 22)
SAIL = (240, 240, 232)
MAST = (70, 50, 35)


@dataclass(frozen=True)
class Scene:
    """Everything a clip is made of; frozen, so an edited scene is dataclasses.replace(scene, ...)."""

    kind: str
    colour: str
    ground: str
    sky: str
    motion: str
    horizon: float       # horizon height, fraction of the frame height from the top
    base: float          # the object's resting bottom edge, fraction of the frame height
    x0: float            # the object's centre at frame 0, fraction of the width
    dx: float            # its horizontal travel over the clip (crossing/bounce), fraction of the width
    pan: float           # camera pan over the clip, fraction of the width (pan motion)
    scale: float         # object width, fraction of the frame width
    hop: float           # bounce height, fraction of the frame height
    bounces: int
    texture_seed: int

    def with_(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _light(scene: Scene) -> str:
    return "at night" if scene.sky == "night" else f"under {_article(scene.sky)} {scene.sky} sky"


def caption(scene: Scene) -> str:
    """The scene in words, e.g. "a red car driving on a road under a blue sky"."""
    verb = VERBS[(scene.kind, scene.motion)]
    return f"{_article(scene.colour)} {scene.colour} {scene.kind} {verb} on {GROUNDS[scene.ground][1]} {_light(scene)}"


def pair_caption(scene: Scene, other: Scene) -> str:
    """Two objects on one ground, in a random but seeded order, e.g. "a red car and a blue ball on a
    road under a blue sky" (no verbs: the second object stands still)."""
    first, second = (scene, other) if scene.texture_seed % 2 else (other, scene)
    objects = " and ".join(f"{_article(o.colour)} {o.colour} {o.kind}" for o in (first, second))
    return f"{objects} on {GROUNDS[scene.ground][1]} {_light(scene)}"


def vocabulary() -> list[str]:
    """Every word any caption can use."""
    words = {"a", "an", "and", "on", "under", "sky", "at", "night", *PALETTE, *KINDS, *VERBS.values(), *SKIES}
    for _, phrase in GROUNDS.values():
        words.update(phrase.split())
    return sorted(words - {"night"} | {"night"})


def sample_scene(seed: int, **fixed) -> Scene:
    """A random scene from a seed; `fixed` pins any field (kind="car", colour="red", ...)."""
    rng = np.random.default_rng(seed)
    kind = fixed.get("kind") or KINDS[rng.integers(len(KINDS))]
    colour = fixed.get("colour") or list(PALETTE)[rng.integers(len(PALETTE))]
    grounds = KIND_GROUNDS[kind]
    ground = fixed.get("ground") or grounds[rng.integers(len(grounds))]
    sky = fixed.get("sky") or str(rng.choice(list(SKIES), p=(0.45, 0.2, 0.2, 0.15)))
    motions = KIND_MOTIONS[kind]
    motion = fixed.get("motion") or motions[rng.integers(len(motions))]
    horizon = rng.uniform(0.35, 0.5)
    wide = kind in ("car", "boat")
    scale = rng.uniform(0.40, 0.50) if wide else rng.uniform(0.27, 0.34)
    base = rng.uniform(horizon + 0.3 * (1 - horizon), 0.95)
    direction = rng.choice((-1.0, 1.0))
    if motion == "crossing":
        dx = direction * rng.uniform(0.25, 0.4)
    elif motion == "bounce":
        dx = direction * rng.uniform(0.05, 0.2)
    else:
        dx = 0.0
    x0 = 0.5 - dx / 2 + rng.uniform(-0.08, 0.08)
    pan = direction * rng.uniform(0.3, 0.6) if motion == "pan" else 0.0
    hop = rng.uniform(0.15, 0.3) if motion == "bounce" else 0.0
    values = dict(kind=kind, colour=colour, ground=ground, sky=sky, motion=motion, horizon=float(horizon),
                  base=float(base), x0=float(x0), dx=float(dx), pan=float(pan), scale=float(scale), hop=float(hop),
                  bounces=int(rng.integers(1, 3)), texture_seed=int(rng.integers(2**31)))
    values.update({k: v for k, v in fixed.items() if k not in ("kind", "colour", "ground", "sky", "motion")})
    return Scene(**values)


def sample_pair(seed: int) -> tuple[Scene, Scene]:
    """Two objects of different kinds and colours side by side on one land ground (training data: a
    caption with two colours makes the model bind each colour word to its own object's pixels,
    which is what makes its cross-attention maps follow the objects). The second Scene only
    contributes its object; the first also gives the backdrop and the camera pan."""
    rng = np.random.default_rng(seed)
    ground = ("grass", "road", "sand")[rng.integers(3)]
    kinds = [k for k in KINDS if ground in KIND_GROUNDS[k]]
    chosen = rng.choice(len(kinds), 2, replace=False)
    colours = rng.choice(len(PALETTE), 2, replace=False)
    left = rng.random() < 0.5
    scenes = []
    for i in range(2):
        scene = sample_scene(int(rng.integers(2**31)), kind=kinds[chosen[i]], colour=list(PALETTE)[colours[i]],
                             ground=ground, motion="pan")
        side = 0.27 if (i == 0) == left else 0.73
        scenes.append(scene.with_(x0=float(side + rng.uniform(-0.04, 0.04)), dx=0.0, scale=scene.scale * 0.7))
    first, second = scenes
    second = second.with_(sky=first.sky, horizon=first.horizon, pan=first.pan)
    return first, second


# ---------------------------------------------------------------------------------------------
# rendering
def _background(scene: Scene, size: int) -> np.ndarray:
    """The scene's backdrop, (size, 2*size, 3) float in [0, 255] (wide enough for the pan)."""
    rng = np.random.default_rng(scene.texture_seed)
    h, w = size, 2 * size
    y = (np.arange(h) + 0.5)[:, None] / h * np.ones((1, w))
    x = (np.arange(w) + 0.5)[None, :] / h * np.ones((h, 1))
    horizon = scene.horizon
    top, bottom = (np.array(c, np.float32) for c in SKIES[scene.sky])
    sky_t = np.clip(y / horizon, 0, 1)[..., None]
    image = top + (bottom - top) * sky_t
    if scene.sky == "night":  # stars
        stars = rng.random((h, w)) < 0.02
        image[stars & (y < horizon)] = (230, 230, 200)
    elif scene.sky in ("blue", "grey"):  # a few soft clouds
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(0, w / h), rng.uniform(0.05, horizon * 0.7)
            rx, ry = rng.uniform(0.12, 0.25), rng.uniform(0.04, 0.07)
            cloud = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
            image[cloud & (y < horizon)] = image[cloud & (y < horizon)] * 0.35 + 0.65 * 245
    ground = y >= horizon
    base = np.array(GROUNDS[scene.ground][0], np.float32)
    depth = np.clip((y - horizon) / (1 - horizon), 0, 1)[..., None]
    noise = rng.normal(0, 1, (h, w))
    if scene.ground == "grass":
        tex = base * (0.85 + 0.25 * depth) + 14 * noise[..., None] * np.array([0.6, 1.0, 0.5])
        blades = (rng.random((h, w)) < 0.08)
        tex[blades] = tex[blades] * 0.7
    elif scene.ground == "road":
        tex = base * (0.9 + 0.15 * depth) + 6 * noise[..., None]
        mid = horizon + 0.55 * (1 - horizon)
        line = (np.abs(y - mid) < 0.5 / h + 0.012) & (np.remainder(x, 0.5) < 0.25)
        tex[line] = (235, 235, 225)
    elif scene.ground == "sea":
        tex = base * (0.85 + 0.3 * depth) + 5 * noise[..., None]
        waves = np.sin(x * 40 + np.sin(y * 30) * 2 + 3 * rng.random()) * np.sin(y * 90) > 0.8
        tex[waves] = tex[waves] * 0.6 + 0.4 * np.array((200, 225, 245))
    else:  # sand
        tex = base * (0.9 + 0.12 * depth) + 9 * noise[..., None]
        specks = rng.random((h, w)) < 0.05
        tex[specks] = tex[specks] * 0.8
    image = np.where(ground[..., None], tex, image)
    if scene.sky == "night":
        image = np.where(ground[..., None], image * np.array(NIGHT_LIGHT), image)
    return np.clip(image, 0, 255)


def _object(scene: Scene, size: int, cx: float, bottom: float):
    """Layers of the object at centre x `cx` and bottom edge `bottom` (pixels): list of (mask, rgb),
    painted in order; the body mask is the first layer's (the object's colour)."""
    n = size
    y = (np.arange(n) + 0.5)[:, None] * np.ones((1, n))
    x = (np.arange(n) + 0.5)[None, :] * np.ones((n, 1))
    w = scene.scale * n
    colour = np.array(PALETTE[scene.colour], np.float32)
    layers = []
    if scene.kind == "car":
        wheel_r = 0.12 * w
        body_bottom = bottom - wheel_r
        body = (np.abs(x - cx) < w / 2) & (y < body_bottom) & (y >= body_bottom - 0.28 * w)
        cab_top = body_bottom - 0.28 * w - 0.22 * w
        cab_half = 0.25 * w - (y - cab_top) * 0.0
        cabin = (np.abs(x - cx + 0.04 * w) < cab_half) & (y >= cab_top) & (y < body_bottom - 0.27 * w)
        window = (np.abs(x - cx + 0.04 * w) < 0.19 * w) & (y >= cab_top + 0.05 * w) & (y < body_bottom - 0.3 * w) & \
            (np.abs(x - cx + 0.04 * w) > 0.02 * w)
        wheels = np.zeros_like(body)
        for wx in (cx - 0.28 * w, cx + 0.28 * w):
            wheels |= (x - wx) ** 2 + (y - body_bottom) ** 2 < wheel_r ** 2
        layers = [((body | cabin) & ~window & ~wheels, colour), (window, WINDOW), (wheels, WHEEL)]
    elif scene.kind == "ball":
        r = w / 2
        cy = bottom - r
        ball = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
        shine = (x - (cx - 0.35 * r)) ** 2 + (y - (cy - 0.35 * r)) ** 2 < (0.22 * r) ** 2
        layers = [(ball & ~shine, colour), (ball & shine, colour * 0.45 + 140)]
    elif scene.kind == "boat":
        hull_h = 0.24 * w
        t = np.clip((bottom - y) / hull_h, 0, 1)  # 0 at the keel, 1 at the deck
        hull = (y < bottom) & (y >= bottom - hull_h) & (np.abs(x - cx) < w * (0.32 + 0.18 * t))
        mast = (np.abs(x - cx) < max(0.03 * w, 0.5)) & (y < bottom - hull_h) & (y >= bottom - hull_h - 0.55 * w)
        sail_t = (bottom - hull_h - y) / (0.5 * w)  # 0 at the boom, 1 at the top
        sail = (sail_t > 0) & (sail_t < 1) & (x > cx + 0.04 * w) & (x < cx + 0.04 * w + 0.38 * w * (1 - sail_t))
        layers = [(hull, colour), (mast, MAST), (sail, SAIL)]
    elif scene.kind == "box":
        top = bottom - w
        box = (np.abs(x - cx) < w / 2) & (y >= top) & (y < bottom)
        edge = box & ((np.abs(x - cx) > w / 2 - 0.13 * w) | (y < top + 0.13 * w) | (y > bottom - 0.13 * w) |
                      (np.abs((x - cx) - (y - (top + w / 2))) < 0.08 * w))
        layers = [(box & ~edge, colour), (edge, colour * 0.55)]
    else:
        raise ValueError(f"unknown object kind {scene.kind!r}: use one of {KINDS}")
    return layers


@dataclass
class Clip:
    """A rendered clip: frames uint8 (F, H, W, 3); masks bool (F, H, W) (the whole object) and body
    bool (F, H, W) (its pixels of the object's colour); caption; scene."""

    frames: np.ndarray
    masks: np.ndarray
    body: np.ndarray
    caption: str
    scene: Scene

    def tensor(self):
        """Frames as a (F, 3, H, W) float tensor in [-1, 1] (what the pipeline takes)."""
        import torch

        return torch.from_numpy(self.frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def render(scene: Scene, num_frames: int = 8, size: int = SIZE, others: tuple[Scene, ...] = ()) -> Clip:
    """Frames, object masks and body masks of a scene: a pure function of its fields. `others` paint
    more objects over it (sample_pair); the masks and the caption stay the first object's."""
    backdrop = _background(scene, size)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    masks = np.zeros((num_frames, size, size), bool)
    body = np.zeros((num_frames, size, size), bool)
    night = np.array(NIGHT_LIGHT) if scene.sky == "night" else np.ones(3)
    for f in range(num_frames):
        t = f / max(num_frames - 1, 1)
        offset = int(round((size / 2) + scene.pan * size * (t - 0.5)))  # pan: the backdrop window moves
        image = backdrop[:, offset:offset + size].copy()
        cx = (scene.x0 + scene.dx * t) * size
        bottom = scene.base * size
        if scene.motion == "bounce":
            bottom -= scene.hop * size * abs(np.sin(np.pi * scene.bounces * t))
        for i, (mask, rgb) in enumerate(_object(scene, size, cx, bottom)):
            image[mask] = np.asarray(rgb, np.float32) * night
            masks[f] |= mask
            if i == 0:
                body[f] = mask
        for other in others:
            for mask, rgb in _object(other, size, (other.x0 + other.dx * t) * size, other.base * size):
                image[mask] = np.asarray(rgb, np.float32) * night
        frames[f] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Clip(frames, masks, body, caption(scene), scene)


def make_clip(seed: int, num_frames: int = 8, size: int = SIZE, **fixed) -> Clip:
    """render(sample_scene(seed, **fixed)): the clip of a seed."""
    return render(sample_scene(seed, **fixed), num_frames, size)


# ---------------------------------------------------------------------------------------------
# judging edits by the palette (the benchmark's rules)
def palette_array() -> tuple[list[str], np.ndarray]:
    return list(PALETTE), np.array(list(PALETTE.values()), np.float32)


def classify_colour(pixels: np.ndarray, night: bool = False) -> str:
    """The palette colour nearest to the median of (N, 3) RGB pixels (night: compared in night light)."""
    names, colours = palette_array()
    if night:
        colours = colours * np.array(NIGHT_LIGHT, np.float32)
    if len(pixels) == 0:
        return "none"
    median = np.median(pixels.reshape(-1, 3).astype(np.float32), axis=0)
    return names[int(np.argmin(((colours - median) ** 2).sum(-1)))]


def colour_pixels(frame: np.ndarray, colour: str, tolerance: float = 70.0, night: bool = False) -> np.ndarray:
    """Boolean (H, W): pixels whose nearest palette colour is `colour`, within `tolerance` (RGB distance)."""
    names, colours = palette_array()
    if night:
        colours = colours * np.array(NIGHT_LIGHT, np.float32)
    d = np.sqrt(((frame.astype(np.float32)[..., None, :] - colours) ** 2).sum(-1))  # (H, W, P)
    return (d.argmin(-1) == names.index(colour)) & (d.min(-1) < tolerance)


def shape_features(mask: np.ndarray) -> dict:
    """Bounding-box aspect (width/height) and fill ratio of a boolean blob (its largest extent)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return dict(area=0, aspect=0.0, fill=0.0)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    rows = ys - ys.min()
    spans = np.zeros(h)  # each row's extent: holes (a box's diagonal, a ball's shine) do not count
    lo, hi = np.full(h, np.inf), np.full(h, -np.inf)
    np.minimum.at(lo, rows, xs)
    np.maximum.at(hi, rows, xs)
    spans = np.where(np.isfinite(lo), hi - lo + 1, 0)
    return dict(area=int(len(xs)), aspect=float(w / h), fill=float(spans.sum() / (w * h)))


def classify_kind(frame: np.ndarray, colour: str, region: np.ndarray, night: bool = False) -> str:
    """The object kind in `region` (bool (H, W)) from the blob of pixels of `colour`: its bounding-box
    aspect and fill. car/boat are wide (aspect > 1.5); a ball fills ~pi/4 of its box, a box ~all of it."""
    blob = colour_pixels(frame, colour, night=night) & region
    feats = shape_features(blob)
    if feats["area"] < 6:
        return "none"
    if feats["aspect"] > 1.5:
        # a boat's hull is a trapezoid narrower at the bottom; a car's body has the cabin on top
        ys, xs = np.nonzero(blob)
        top_w = np.ptp(xs[ys <= np.percentile(ys, 25)]) + 1
        bottom_w = np.ptp(xs[ys >= np.percentile(ys, 75)]) + 1
        return "boat" if top_w > bottom_w * 1.1 else "car"
    return "box" if feats["fill"] > 0.9 else "ball"
