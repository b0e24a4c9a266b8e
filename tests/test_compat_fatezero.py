"""fatezero_fast.compat.fatezero: the official FateZero code with the fused attention.

The tests that run the official code skip unless FATEZERO_SRC points at a checkout of it (never
part of this project) and FATEZERO_PYTHON (default: this Python) can import its dependencies
(diffusers 0.11.x, transformers, accelerate, einops, omegaconf, click, opencv, imageio; pytest for
the layer-level check) and this package. They run it in child processes with that Python, so the
stand-in modules other tests install (test_official_semantics.py) cannot mix with it, and the
official stack can live in its own venv:

- layer level (this file run as a script): two copies of the same tiny official UNet driven by
  official controllers, one registered by the official register_attention_control, one patched,
  through an inversion and three edits (refine + eq, replace + blend words +
  blend_self_attention + blend_latents, an unknown controller subclass), at latents where every
  level is controlled and where one is not, and with a disk_store controller. fp64 (reference
  backend): the free-running trajectories agree to ~1e-14, i.e. the semantics are the official
  ones; fp32 (the C++ kernel): every UNet call and step callback, fed the official trajectory,
  agrees within 1e-5. Counters, position dicts, blend masks and store contents are compared too.
- pipeline level (benchmarks/compare_official.py): test_fatezero.py's own entry point on the
  official teaser configs, shrunk; final edited latents compared. Free-running fp32 edits amplify
  rounding (classifier-free guidance, DDIM at high noise): the official code run on one thread
  instead of two differs from itself by 1.5e-5 to 4e-5 relative after 5-10 steps here, so the
  patched run must be within max(1e-5, 2 x that floor), measured in the same test. The `tuned`
  case runs a FateZero-tuned checkpoint (built and saved by the official code, random temporal
  weights: LoRA temporal convs, temporal attention).
- this project's own CLI (`fatezero-fast edit --config`, run by this Python) on the same shrunk
  official configs, plain SD and tuned: final edited latents within 1e-3 of the official ones.

Relative error: max |a - b| / max |a|.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fatezero_fast.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SRC = os.environ.get("FATEZERO_SRC")
OFFICIAL_PYTHON = os.environ.get("FATEZERO_PYTHON") or sys.executable
TOLERANCE = 1e-5
CLI_TOLERANCE = 1e-3  # our own pipeline, free-running from the clip: another order of every sum
PROBE = ("import diffusers, transformers, accelerate, einops, omegaconf, click, cv2, imageio, fatezero_fast; "
         "assert diffusers.__version__.startswith('0.11'), 'diffusers ' + diffusers.__version__")


@functools.lru_cache(maxsize=1)
def _why_official_cannot_run() -> str | None:
    if not SRC:
        return "set FATEZERO_SRC to an official FateZero checkout"
    if not (Path(SRC) / "test_fatezero.py").is_file():
        return f"FATEZERO_SRC={SRC} is not a FateZero checkout"
    probe = subprocess.run([OFFICIAL_PYTHON, "-c", PROBE], capture_output=True, text=True, env=_child_env())
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"the official code's dependencies are not importable by {OFFICIAL_PYTHON} ({last})"
    return None


def _needs_official():
    reason = _why_official_cannot_run()
    if reason:
        pytest.skip(reason)


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------- without the official code

def test_patch_rejects_bad_options():
    from fatezero_fast.compat import fatezero

    with pytest.raises(InputError, match="recompute"):
        fatezero.patch(store="recompute")
    with pytest.raises(InputError, match="unknown store"):
        fatezero.patch(store="maps")
    with pytest.raises(InputError, match="backend"):
        fatezero.patch(backend="fast")
    with pytest.raises(InputError, match="placement"):
        fatezero.patch(placement="gpu")
    assert not fatezero.is_patched()


def test_patch_needs_the_official_code(tmp_path):
    """Importing the compat module imports no official code; patch() says what is missing."""
    code = ("import sys; from fatezero_fast.compat import fatezero; "
            "assert not any(m.startswith('video_diffusion') for m in sys.modules); "
            f"fatezero.patch(src={str(tmp_path)!r})")
    env = {k: v for k, v in _child_env().items() if k != "FATEZERO_SRC"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "InputError" in proc.stderr and "not a FateZero checkout" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- layer level (child process)

@pytest.mark.parametrize("mode", ["fp64", "fp32"])
def test_layers_match_the_official_code(mode, tmp_path):
    """fp64 (reference backend): whole inversion + edit trajectories equal to ~1e-15, i.e. the same
    semantics; fp32 (the C++ kernel): every UNet call and every step callback, fed the official
    trajectory, equal within 1e-5 (free-running fp32 trajectories drift apart at the official
    code's own rounding floor, see benchmarks/compare_official.py)."""
    _needs_official()
    out = tmp_path / "layers.json"
    proc = subprocess.run([OFFICIAL_PYTHON, __file__, "layers", mode, str(out), SRC], capture_output=True,
                          text=True, env=_child_env(), cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(out.read_text())
    tolerance = 1e-10 if mode == "fp64" else TOLERANCE
    names = [case["name"] for case in report["cases"]]
    assert any(n.startswith("replace+blend") for n in names) and any("@72" in n for n in names), names
    for case in report["cases"]:
        name = case["name"]
        assert case["max_rel"] <= tolerance, (name, case)
        assert case["counters_equal"], (name, case)
        assert case["masks_equal"], (name, case)
        if case.get("blend"):
            assert 0 < case["mask_mean"] < 1, (name, case)  # the row mask really mixes source and edit
        if "side_store_files" in case:  # a disk_store controller: the captured Q/K go to disk too
            assert case["side_store_files"] > 0, (name, case)
        if case.get("unknown"):  # official forwards, fed with the captured sources materialized
            assert case["warned"], (name, case)
            assert case["patched_self_maps"] == case["official_self_maps"] > 0, (name, case)
        else:  # the official store's self-map lists stay empty
            assert case["official_self_maps"] > 0 and case["patched_self_maps"] == 0, (name, case)
    assert report["side_store_bytes"] > 0


# ---------------------------------------------------------------- a tuned checkpoint, one UNet call

TUNED_LORA = 48  # the tiny model's 32-channel layers get 16 (the official clamp), the 64-channel ones 48


def _official_tuned_call(src: str, work: str) -> None:
    """Run in a child process (the official stack): a random FateZero-tuned checkpoint, saved by the
    official code, and its official UNetPseudo3DConditionModel's output on fixed float64 inputs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare_official

    work = Path(work)
    base = compare_official.build_model(work / "base", "tiny", heads=2, top_attention=False)
    folder = compare_official.build_tuned_model(work / "tuned", base, Path(src), {"lora": TUNED_LORA})
    from video_diffusion.models.unet_3d_condition import UNetPseudo3DConditionModel

    unet = UNetPseudo3DConditionModel.from_2d_model(str(folder / "unet"), model_config={"lora": TUNED_LORA})
    unet = unet.eval().double()
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 3, 16, 16, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 77, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = unet(sample, 601, encoder_hidden_states=ctx).sample
        for name, p in unet.named_parameters():  # the same model with identities for its temporal layers
            if ".attn_temporal.to_out." in name or name.endswith("conv_temporal.up.weight"):
                torch.nn.init.zeros_(p)
        plain = unet(sample, 601, encoder_hidden_states=ctx).sample
    torch.save({"sample": sample, "ctx": ctx, "out": out, "plain": plain}, work / "official_call.pt")


def test_tuned_checkpoint_unet_equals_the_official_one(tmp_path):
    """A checkpoint saved by the official code, loaded here (stock UNet + temporal hooks): one UNet
    call equals the official UNetPseudo3DConditionModel's to 1e-12 in float64, and its temporal
    layers change the output clearly."""
    _needs_official()
    from fatezero_fast.models.loading import load_unet
    from fatezero_fast.unet.processors import VideoAttentionConfig, install

    proc = subprocess.run([OFFICIAL_PYTHON, __file__, "tuned-call", SRC, str(tmp_path)], check=False,
                          capture_output=True, text=True, env=_child_env(), cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    official = torch.load(tmp_path / "official_call.pt")
    sample, ctx = official["sample"], official["ctx"]
    unet, fmt = load_unet(tmp_path / "tuned", lora=TUNED_LORA)
    assert fmt.kind == "fatezero" and fmt.temporal.conv == "lora" and fmt.temporal.rank == TUNED_LORA
    unet = unet.double()
    state = install(unet, VideoAttentionConfig(sparse_causal_index=[-1, "first"], backend="reference"))
    b, c, f, h, w = sample.shape
    state.begin_call("plain", f, (h, w))
    with torch.no_grad():
        out = unet(sample.transpose(1, 2).reshape(b * f, c, h, w), 601,
                   encoder_hidden_states=ctx.repeat_interleave(f, 0)).sample
    out = out.reshape(b, f, c, h, w).transpose(1, 2)
    assert _rel(official["out"], out) <= 1e-12
    assert _rel(official["out"], official["plain"]) > 0.1  # the temporal weights matter


# ---------------------------------------------------------------- pipeline level (child processes)

def _compare_official(case: str, variants: str, tmp_path, *extra: str) -> dict:
    """benchmarks/compare_official.py on one case (official code by FATEZERO_PYTHON, cli by this Python)."""
    out = tmp_path / "compare.json"
    cmd = [OFFICIAL_PYTHON, str(REPO / "benchmarks" / "compare_official.py"), "--src", SRC, "--cases", case,
           "--steps", os.environ.get("FATEZERO_COMPAT_STEPS", "5"), "--workdir", str(tmp_path / "work"),
           "--variants", variants, "--cli-python", sys.executable, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())["results"][0]


EDIT_COUNTS = {"style": 2, "shape": 1, "tuned": 2}


@pytest.mark.parametrize("case", ["style", "shape", "tuned"])
def test_official_pipeline_gives_the_same_edits(case, tmp_path):
    """test_fatezero.py's own entry point, official vs patched, and official on one thread: the
    official code's own rounding floor (fp32 edits amplify rounding: classifier-free guidance and
    DDIM at high noise levels). Patched must be within max(1e-5, 2 x that floor). The other runs use
    two threads whatever OMP_NUM_THREADS says (on one thread both runs would sum in the same order)."""
    _needs_official()
    result = _compare_official(case, "official,patched,official-1thread", tmp_path, "--threads", "2")
    patched, floor = result["compared"]["patched"], result["compared"]["official-1thread"]
    assert len(patched["edits"]) == EDIT_COUNTS[case]
    for what in ("inversion", "edits"):
        for ours, theirs in zip(patched[what], floor[what]):
            assert ours["rel_diff"] <= max(TOLERANCE, 2 * theirs["rel_diff"]), (what, ours, theirs)
    assert result["official"]["official_self_maps"] > 0
    assert result["patched"]["official_self_maps"] == 0 and result["patched"]["side_store_bytes"] > 0
    assert result["patched"]["official_store_bytes"] < result["official"]["official_store_bytes"]
    if case == "shape":  # the blend masks really mix source and edit (latent blend: the source words' mask)
        assert 0 < result["official"]["latent_blend_mask_mean"][0] < 1, result["official"]


@pytest.mark.parametrize("case", ["style", "tuned"])
def test_cli_gives_the_official_edits(case, tmp_path):
    """`fatezero-fast edit --config` on the same shrunk official config (the tuned case: a checkpoint
    saved by the official code) gives the official final latents within 1e-3 relative."""
    _needs_official()
    result = _compare_official(case, "official,cli", tmp_path)
    edits = result["compared"]["cli"]["edits"]
    assert len(edits) == EDIT_COUNTS[case]
    for row in edits:
        assert row["rel_diff"] <= CLI_TOLERANCE, row
    print(f"{case}: cli vs official, max relative error {max(r['rel_diff'] for r in edits):.2e}")


# ---------------------------------------------------------------- the layer-level check itself

SOURCE_PROMPT = "a silver jeep driving down a curvy road in the countryside"
EDITS = {
    "refine+eq": dict(prompt="watercolor painting of a silver jeep driving down a curvy road in the countryside",
                      is_replace_controller=False, cross_replace_steps={"default_": 0.8}, self_replace_steps=0.8,
                      equilizer_params={"words": ["watercolor"], "values": [10]}),
    "replace+blend": dict(prompt="a Porsche car driving down a curvy road in the countryside",
                          is_replace_controller=True, cross_replace_steps={"default_": 0.5}, self_replace_steps=0.8,
                          blend_words=[["silver", "jeep"], ["Porsche", "car"]], blend_self_attention=True,
                          blend_latents=True, blend_th=(0.5, 0.5)),
    "unknown-subclass": dict(prompt="watercolor painting of a silver jeep driving down a curvy road in the "
                                    "countryside", is_replace_controller=False, cross_replace_steps={"default_": 0.8},
                             self_replace_steps=0.6, unknown=True),
}
SELF_KEYS = ("down_self", "mid_self", "up_self")
CROSS_KEYS = ("down_cross", "mid_cross", "up_cross")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def _self_maps(store) -> int:
    total = 0
    for entry in store.attention_store_all_step:
        maps = torch.load(entry) if isinstance(entry, str) else entry
        total += sum(len(maps[k]) for k in SELF_KEYS)
    return total


def _layers(mode: str, out_path: str, src: str) -> None:
    """Run in a child process: see test_layers_match_the_official_code.

    The same tiny official UNet (in two copies) is driven by official controllers: one copy
    registered by the official register_attention_control, the other by the patched one.
    fp64: each copy runs its own trajectory (reference backend); fp32: both are fed the official
    trajectory, so every UNet call and step callback is compared on equal inputs.
    """
    import copy
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare_official  # the official-format model builder and the CPU stand-ins

    try:
        import torchvision  # noqa: F401
    except Exception:
        compare_official._torchvision_stand_in()
    if not torch.cuda.is_available():
        torch.cuda.get_device_name = lambda *args, **kwargs: "cpu"
    sys.path.insert(0, src)
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler
    from video_diffusion.models.unet_3d_condition import UNetPseudo3DConditionModel
    from video_diffusion.pipelines.p2p_ddim_spatial_temporal import (
        P2pDDIMSpatioTemporalPipeline,
    )
    from video_diffusion.prompt_attention import attention_util as au

    from fatezero_fast.compat import fatezero
    from fatezero_fast.models import SCHEDULER_CONFIG
    from fatezero_fast.models.tokenizer import clip_tokenizer

    exact = mode == "fp64"
    dtype = torch.float64 if exact else torch.float32
    fatezero.patch(store=os.environ.get("FATEZERO_COMPAT_STORE", "qk"), backend="reference" if exact else "auto")
    official_register = fatezero.official_register_attention_control()
    assert au.register_attention_control is fatezero.register_attention_control
    work = Path(tempfile.mkdtemp(prefix="compat_layers_"))
    model_dir = compare_official.build_model(work / "model", "tiny", heads=2, top_attention=False)
    tok = clip_tokenizer()
    steps, frames, guidance = 5, 3, 7.5
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    helper = SimpleNamespace(scheduler=scheduler)
    cases, side_bytes = [], 0

    class MyRefine(au.AttentionRefine):
        """A controller subclass the compat layer does not know."""

    def make(spec, store, save_path):
        kwargs = {k: v for k, v in spec.items() if k not in ("prompt", "unknown")}
        controller = au.make_controller(tok, [SOURCE_PROMPT, spec["prompt"]], NUM_DDIM_STEPS=steps,
                                        additional_attention_store=store, use_inversion_attention=True,
                                        save_path=save_path, save_self_attention=False, **kwargs)
        if spec.get("unknown"):
            controller.__class__ = MyRefine
        for c in (controller, getattr(controller, "prev_controller", None)):
            if c is not None and getattr(c, "mapper", None) is not None and c.mapper.is_floating_point():
                c.mapper = c.mapper.to(dtype)  # the official einsum needs one dtype (fp64 run)
        return controller

    def register(fn, pipe, controller):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(pipe, controller)
        return any("unknown FateZero controller" in str(w.message) for w in caught)

    # (latent size, model_config, disk store): 16x16: every attention level controlled; 72x72: the
    # 36x36 level has 1296 query tokens, uncontrolled (the official code neither stores nor edits it)
    settings = [(16, {}, False), (72, {"SparseCausalAttention_index": ["mid"]}, False)]
    if exact:
        settings.append((16, {"SparseCausalAttention_index": [-1, "last"]}, True))
    for latent, model_config, disk in settings:
        tag = f"@{latent}" + ("-disk" if disk else "")
        torch.manual_seed(0)
        unet = UNetPseudo3DConditionModel.from_2d_model(str(model_dir / "unet"), model_config=model_config)
        for name, module in unet.named_modules():
            if name.endswith("attn_temporal"):
                torch.nn.init.zeros_(module.to_out[0].bias)
        unet = unet.eval().to(dtype)
        pipes = {"official": SimpleNamespace(unet=unet), "patched": SimpleNamespace(unet=copy.deepcopy(unet))}
        registers = {"official": official_register, "patched": fatezero.register_attention_control}
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(1, 4, frames, latent, latent, generator=g).to(dtype)
        emb = {k: 4 * torch.randn(1, 77, 32, generator=g).to(dtype) for k in ("source", "target", "uncond")}

        # inversion (LOW_RESOURCE AttentionStore, the conditional branch only)
        stores, z, rels = {}, {}, []
        for v in pipes:
            stores[v] = au.AttentionStore(disk_store=disk)
            if disk:  # the official store names its folder by the second it was made in: one each
                stores[v].store_dir = str(work / v / "attention_cache")
                os.makedirs(stores[v].store_dir)
            stores[v].LOW_RESOURCE = True
            registers[v](pipes[v], stores[v])
            z[v] = x0.clone()
        with torch.no_grad():
            for i in range(steps):
                t = scheduler.timesteps[steps - i - 1]
                eps = {v: pipes[v].unet(z[v], t, encoder_hidden_states=emb["source"]).sample for v in pipes}
                rels.append(_rel(eps["official"], eps["patched"]))
                before = dict(z)
                for v in pipes:
                    z[v] = P2pDDIMSpatioTemporalPipeline.next_clean2noise_step(
                        helper, eps[v], t, before[v] if exact else before["official"])
                rels.append(_rel(z["official"], z["patched"]))
                for v in pipes:
                    stores[v].step_callback(z[v] if exact else z["official"])
        inverted = {v: (z[v] if exact else z["official"]) for v in pipes}
        side_bytes += fatezero.source_store(stores["patched"]).nbytes()
        cross_equal = all(
            _rel(a, b) <= (1e-10 if exact else TOLERANCE)
            for s in range(steps) for key in CROSS_KEYS
            for a, b in zip(*((torch.load(e) if isinstance(e, str) else e)[key]
                              for e in (stores["official"].attention_store_all_step[s],
                                        stores["patched"].attention_store_all_step[s]))))
        official_first = stores["official"].attention_store_all_step[1]
        official_first = torch.load(official_first) if isinstance(official_first, str) else official_first
        rels.append(_rel(official_first["up_self"][0],
                         fatezero.self_attention_probs(stores["patched"], 1, "up_self", 0).to(dtype)))
        cases.append({"name": "inversion" + tag, "max_rel": max(rels),
                      "official_self_maps": _self_maps(stores["official"]),
                      "patched_self_maps": _self_maps(stores["patched"]),
                      "counters_equal": cross_equal and stores["official"].cur_step == stores["patched"].cur_step
                      and stores["official"].num_att_layers == stores["patched"].num_att_layers
                      and len(stores["official"].latents_store) == len(stores["patched"].latents_store),
                      "masks_equal": True})
        if disk:
            cases[-1]["side_store_files"] = len(list(
                (Path(stores["patched"].store_dir) / "fatezero_fast_self").glob("step_*.pt")))
        print(json.dumps(cases[-1]), flush=True)

        # edits (classifier-free guidance; the controller edits the conditional half)
        for name, spec in EDITS.items():
            if disk and name != "replace+blend":
                continue
            controllers, warned = {}, False
            for v in pipes:
                controllers[v] = make(spec, stores[v], str(work / v))
                warned = register(registers[v], pipes[v], controllers[v]) or warned
            x, rels = dict(inverted), []
            cond = torch.cat([emb["uncond"], emb["target"]])
            with torch.no_grad():
                for t in scheduler.timesteps:
                    step = {}
                    for v in pipes:
                        latent_in = x[v] if exact else x["official"]
                        eps = pipes[v].unet(torch.cat([latent_in] * 2), t, encoder_hidden_states=cond).sample
                        uncond, text = eps.chunk(2)
                        step[v] = (eps, scheduler.step(uncond + guidance * (text - uncond), t, latent_in).prev_sample)
                    rels.append(_rel(step["official"][0], step["patched"][0]))
                    for v in pipes:
                        x[v] = controllers[v].step_callback(step[v][1])
                    rels.append(_rel(x["official"], x["patched"]))
            off, new = controllers["official"], controllers["patched"]
            masks = {v: ([] if c.attention_blend is None else c.attention_blend.mask_list)
                     + ([] if c.latent_blend is None else c.latent_blend.mask_list) for v, c in controllers.items()}
            attention_masks = [] if off.attention_blend is None else off.attention_blend.mask_list
            case = {"name": name + tag, "blend": bool(attention_masks), "unknown": bool(spec.get("unknown")),
                    "max_rel": max(rels),
                    "official_self_maps": _self_maps(stores["official"]),
                    "patched_self_maps": _self_maps(stores["patched"]),
                    "counters_equal": off.cur_step == new.cur_step and off.cur_att_layer == new.cur_att_layer
                    and off.num_att_layers == new.num_att_layers
                    and off.attention_position_counter_dict == new.attention_position_counter_dict
                    and all(len(off.attention_store[k]) == len(new.attention_store[k]) for k in CROSS_KEYS),
                    "masks_equal": len(masks["official"]) == len(masks["patched"])
                    and all(torch.equal(a, b) for a, b in zip(masks["official"], masks["patched"])),
                    "mask_mean": float(torch.cat([m.flatten() for m in attention_masks]).mean())
                    if attention_masks else None,
                    "warned": warned}
            cases.append(case)
            print(json.dumps(case), flush=True)
    Path(out_path).write_text(json.dumps({"mode": mode, "cases": cases, "side_store_bytes": side_bytes}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "layers":
        _layers(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "tuned-call":
        _official_tuned_call(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python tests/test_compat_fatezero.py layers fp64|fp32 OUT.json FATEZERO_SRC\n"
                 "       python tests/test_compat_fatezero.py tuned-call FATEZERO_SRC WORKDIR")
