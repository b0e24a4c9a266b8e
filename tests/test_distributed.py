"""Frames split over ranks (gloo, CPU) give the single-process run: inversion and edit latents.

Each world size is one torch.multiprocessing spawn whose ranks run several cases; the parent runs
the same cases in one process and compares. float64 runs carry exactness (1e-12), fp32 1e-5.
Tuned video models (FateZero with a LoRA temporal conv, Tune-A-Video) exchange the temporal
conv's halo frames and run temporal attention over pixel shards (unet/shard.py).
"""
import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fatezero_fast.edit.inversion import Inversion
from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.models import random_components
from fatezero_fast.models.tuned import random_tuned_components
from fatezero_fast.stores import make_store
from fatezero_fast.unet.chunks import ChunkSchedule, ClipActivation
from fatezero_fast.unet.processors import VideoAttentionConfig
from fatezero_fast.unet.shard import exchange_bytes, frame_range, token_slabs

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
EDIT = dict(blend_words=[["car"], ["car"]], blend_self_attention=True, blend_latents=True, guidance_scale=7.5)
LATENT = (8, 5)
# tiny models: plain SD, or random tuned ones (their temporal layers far from the identity)
MODELS = {"sd": lambda: random_components("tiny", seed=0),
          "fatezero-lora": lambda: random_tuned_components("fatezero", "tiny", conv="lora", lora=8, seed=5),
          "tuneavideo": lambda: random_tuned_components("tuneavideo", "tiny", seed=5)}
# (name, world size, model, frames, index list, store, chunk size inside a rank, dtype); tuned models
# split 5 frames 2+3 (a LoRA conv's reach of 2 spans a rank), 3 frames 1+2, 4 frames 1+1+2 (rank 2's
# halo comes from two ranks); Tune-A-Video's temporal attention runs the FateZero one's code
CASES = [
    ("odd-frames", 2, "sd", 5, [-1, "first"], "recompute", None, torch.float64),
    ("qk-chunked", 2, "sd", 5, ["mid"], "qk", 2, torch.float64),
    ("fp32", 2, "sd", 4, [-2, -1], "recompute", None, torch.float32),
    ("lora-odd-frames", 2, "fatezero-lora", 5, [-1, "first"], "recompute", 2, torch.float64),
    ("tuneavideo-fp32", 2, "tuneavideo", 3, ["first", -1], "qk", None, torch.float32),
    ("one-frame-ranks", 3, "sd", 4, ["mid"], "lowrank-budget", 1, torch.float64),
    ("neighbours", 3, "sd", 5, [-2, -1], "recompute", 1, torch.float64),
    ("lora-one-frame-ranks", 3, "fatezero-lora", 4, ["mid"], "qk", None, torch.float64),
]
# cases whose inversion rank 0 saves (the store gathered from the ranks), to be edited in one process
SAVED = ("qk-chunked", "one-frame-ranks", "lora-one-frame-ranks")


def make_pipe(model, index_list, dtype):
    return FateZeroPipeline(**copy.deepcopy(MODELS[model]()), device="cpu", dtype=dtype,
                            attention=VideoAttentionConfig(sparse_causal_index=index_list,
                                                           backend="reference" if dtype == torch.float64 else "auto"))


def run_case(model, frames, index_list, store, chunk, dtype, distribute, save_to=None):
    pipe = make_pipe(model, index_list, dtype)
    if distribute:
        assert pipe.distribute()
    if store == "lowrank-budget":  # each chunk's rank from an error budget: ranks widen the layers alike
        store = make_store("lowrank", error_budget=0.02)
    torch.manual_seed(0)
    latents = torch.randn(frames, 4, *LATENT, dtype=dtype)
    inversion = pipe.invert(None, SOURCE, 3, latents=latents, store=store, progress=False, chunk_size=chunk)
    if save_to is not None:
        inversion.save(save_to)
    edit = pipe.edit(inversion, TARGET, progress=False, decode=False, chunk_size=chunk, **EDIT)
    return {"inversion": inversion.latents.clone(), "maps": inversion.token_maps.clone(), "edit": edit.latents,
            "masks": edit.masks}


def count_bytes(rank, world, model, chunk, frames=5):
    """(bytes the rank sent in one inversion call, as counted; as exchange_bytes computes them)."""
    pipe = FateZeroPipeline(**copy.deepcopy(MODELS[model]()), device="cpu",
                            attention=VideoAttentionConfig(sparse_causal_index=[-1, "first"]))
    assert pipe.distribute()
    pipe.state.begin_call("invert", frames, LATENT, capture_branch=0)
    before = pipe.shard.sent
    pipe._unet([torch.randn(frames, 4, *LATENT)], [pipe.encode_prompt(SOURCE)], 500, chunk)
    captured = len(pipe.state.captured_buffers())
    assert captured > 0
    return pipe.shard.sent - before, exchange_bytes(pipe.unet, LATENT, frames, world, rank, 1, captured, chunk)


def encode(distribute):
    """A 5-frame clip's VAE latents, encoded 2 frames at a time (chunks straddle the ranks' frames)."""
    pipe = FateZeroPipeline(**copy.deepcopy(random_components("tiny", seed=0)), device="cpu", dtype=torch.float64)
    if distribute:
        assert pipe.distribute()
    video = torch.rand(5, 3, 8 * LATENT[0], 8 * LATENT[1], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)) * 2 - 1
    return pipe.encode_video(video, torch.Generator().manual_seed(4), chunk=2)


def _rank(rank, world, init, out, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {name: run_case(*args, distribute=True, save_to=f"{out}.{name}" if rank == 0 and name in SAVED
                                  else None) for name, *args in cases}
        results["encoded"] = encode(distribute=True)
        results["bytes"] = [count_bytes(rank, world, "sd", None), count_bytes(rank, world, "fatezero-lora", 1)]
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def test_frame_ranges_are_contiguous_and_balanced():
    for frames in range(1, 12):
        for world in range(1, frames + 1):
            ranges = [frame_range(frames, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == frames
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


class _RankOf:
    """A rank's share of a whole clip (F, B, ...) without a process group: its halos are cut from the clip."""

    def __init__(self, clip, rank, world):
        self.clip, self.rank, self.world = clip, rank, world

    def frames(self, num_frames):
        return frame_range(num_frames, self.rank, self.world)

    def halo(self, x, num_frames, reach):
        lo, hi = self.frames(num_frames)
        return self.clip[max(0, lo - reach):lo], self.clip[hi:hi + reach]


def test_a_rank_reads_its_chunks_with_the_neighbour_frames():
    frames, branches = 11, 2
    clip = torch.randn(frames, branches, 3, 2, 2)  # frame-major, as a ClipActivation keeps it

    def rows(a, e):
        return clip[a:e].transpose(0, 1).reshape(-1, 3, 2, 2)

    for world in (1, 2, 3):
        for rank in range(world):
            for chunk in (1, 2, 3):
                for reach in (0, 1, 2):
                    shard = _RankOf(clip, rank, world)
                    schedule = ChunkSchedule(frames, branches, chunk, torch.device("cpu"), False, None, None, shard)
                    x = ClipActivation(schedule, stats=False)
                    for a, e in schedule.bounds:
                        x.write(a, e, rows(a, e))
                    for a, e, (got,) in schedule.each([x], reach):
                        assert torch.equal(got, rows(max(0, a - reach), min(frames, e + reach))), (world, rank, a)


def test_token_slabs_cover_the_tokens_in_balanced_blocks():
    for tokens in range(1, 30):
        for world in (1, 2, 3):
            for step in (1, 4, 40):
                slabs = token_slabs(tokens, step, world)
                blocks = [b for slab in slabs for b in slab]
                assert blocks[0][0] == 0 and blocks[-1][1] == tokens
                assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
                for slab in slabs:
                    sizes = [e - a for a, e in slab]
                    assert len(slab) == world and max(sizes) <= step and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_runs_equal_one_process(tmp_path, world):
    cases = [(name, *args) for name, w, *args in CASES if w == world]
    out = tmp_path / "result"
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'init'}", str(out), cases), nprocs=world, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    for r in ranks:
        for counted, computed in r["bytes"]:
            assert counted == computed > 0
    encoded = encode(distribute=False)
    for r in ranks:  # each rank encoded its frames with the clip's noise
        assert rel_err(r["encoded"], encoded) <= 1e-12
    for name, *args in cases:
        expected = run_case(*args, distribute=False)
        tol = 1e-5 if args[-1] == torch.float32 else 1e-12
        for got in (r[name] for r in ranks):
            for key in ("inversion", "maps", "edit"):
                assert rel_err(got[key], expected[key]) <= tol, (name, key)
            assert set(got["masks"]) == set(expected["masks"]) and expected["masks"], name
            for mask, value in expected["masks"].items():
                assert torch.equal(got["masks"][mask], value), (name, mask)
        if name in SAVED:  # the saved multi-rank inversion, edited in one process
            model, _, index_list, _, chunk, dtype = args
            edit = make_pipe(model, index_list, dtype).edit(Inversion.load(f"{out}.{name}"), TARGET, progress=False,
                                                            decode=False, chunk_size=chunk, **EDIT)
            assert rel_err(edit.latents, expected["edit"]) <= tol, name


def _failing_rank(rank, world, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    if rank == 1:  # fails in the middle of the edit, while rank 0 waits in a collective
        real_step = FateZeroPipeline._unet
        calls = []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("rank 1 failed on purpose")
            return real_step(self, *args, **kwargs)
        FateZeroPipeline._unet = failing
    run_case("sd", 4, [-1, "first"], "recompute", None, torch.float32, distribute=True)


def test_a_failing_rank_ends_every_rank(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        mp.spawn(_failing_rank, args=(2, f"file://{tmp_path / 'init'}"), nprocs=2, join=True)
    assert time.monotonic() - start < 120  # the other rank was ended, not left waiting


def test_a_disk_store_is_not_split(tmp_path):
    from fatezero_fast.errors import InputError

    pipe = FateZeroPipeline(**random_tuned_components("fatezero", "tiny"), device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert pipe.distribute()  # a tuned model splits
        with pytest.raises(InputError, match="disk store cannot be kept over several ranks"):
            pipe.invert(None, SOURCE, 2, latents=torch.randn(2, 4, *LATENT), progress=False,
                        store=make_store("qk", placement="disk", folder=tmp_path / "store"))
    finally:
        dist.destroy_process_group()
