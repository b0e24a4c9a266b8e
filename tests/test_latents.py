"""Long-clip keeping of the inversion latents (fp16, on disk) and chunk_size="auto" (tiny model, CPU)."""
import pytest
import torch

from fatezero_fast.edit.inversion import Inversion
from fatezero_fast.edit.steps import DiskSteps
from fatezero_fast.errors import InputError
from fatezero_fast.models import CONFIGS
from fatezero_fast.unet import chunk_size as chunking

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
STEPS = 3
EDIT = dict(blend_words=[["car"], ["car"]], blend_self_attention=True, blend_latents=True)


@pytest.fixture(scope="module")
def host(tiny_pipeline, clip):
    return tiny_pipeline.invert(clip, SOURCE, STEPS, seed=3, progress=False)


def edit(pipe, inversion):
    return pipe.edit(inversion, TARGET, decode=False, progress=False, **EDIT).latents


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_disk_latents_equal_host_latents(tiny_pipeline, clip, host, tmp_path):
    disk = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=3, progress=False, latents_folder=tmp_path / "z")
    assert isinstance(disk.latents, DiskSteps) and disk.latents.shape == host.latents.shape
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == \
        [f"step_{i:04d}.pt" for i in range(STEPS + 1)] + ["token_maps"]
    for i in range(STEPS + 1):
        assert torch.equal(disk.latents[i], host.latents[i])
    assert isinstance(disk.token_maps, DiskSteps) and disk.token_maps.folder == tmp_path / "z" / "token_maps"
    for i in range(STEPS):  # the source token maps of the mask level go with the latents
        assert torch.equal(disk.token_maps[i], host.token_maps[i])
    assert torch.equal(edit(tiny_pipeline, disk), edit(tiny_pipeline, host))


def test_fp16_latents_edit_close_to_fp32(tiny_pipeline, clip, host):
    half = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=3, progress=False, latents_dtype="fp16")
    assert half.latents.dtype == torch.float16 and host.latents.dtype == torch.float32
    assert half.latents.nbytes * 2 == host.latents.nbytes
    assert rel_err(half.latents, host.latents) < 2 ** -11  # fp16 rounding of each kept step
    # measured 3.4e-4 (latents 2.0e-4; 3 frames, 3 steps): the rounded start and source branch carry through
    assert rel_err(edit(tiny_pipeline, half), edit(tiny_pipeline, host)) < 2e-3


@pytest.mark.parametrize("dtype,on_disk", [("fp16", False), ("fp32", True), ("fp16", True)])
def test_save_load_round_trip(tiny_pipeline, clip, host, tmp_path, dtype, on_disk):
    folder = tmp_path / "z" if on_disk else None
    inversion = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=3, progress=False, latents_dtype=dtype,
                                     latents_folder=folder)
    expected = edit(tiny_pipeline, inversion)
    inversion.save(tmp_path / "saved")
    loaded = Inversion.load(tmp_path / "saved")
    assert type(loaded.latents) is type(inversion.latents) and loaded.latents.dtype == inversion.latents.dtype
    assert type(loaded.token_maps) is type(inversion.token_maps)
    if on_disk:  # the saved folder holds its own copy of the steps
        assert loaded.latents.folder == inversion.latents.folder == tmp_path / "saved" / "latents"
        assert loaded.token_maps.folder == inversion.token_maps.folder == tmp_path / "saved" / "latents" / "token_maps"
    for i in range(STEPS + 1):
        assert torch.equal(loaded.latents[i], inversion.latents[i])
    for i in range(STEPS):
        assert torch.equal(loaded.token_maps[i], inversion.token_maps[i])
    assert torch.equal(edit(tiny_pipeline, loaded), expected)


def test_incomplete_disk_latents(tiny_pipeline, clip, tmp_path):
    inversion = tiny_pipeline.invert(clip, SOURCE, 2, seed=3, progress=False, latents_folder=tmp_path / "z")
    inversion.save(tmp_path / "saved")
    (tmp_path / "saved" / "latents" / "step_0001.pt").unlink()
    with pytest.raises(InputError, match=r"latents lacks the files of steps \[1\]"):
        Inversion.load(tmp_path / "saved")
    inversion = tiny_pipeline.invert(clip, SOURCE, 2, seed=3, progress=False, latents_folder=tmp_path / "z2")
    inversion.save(tmp_path / "saved2")
    (tmp_path / "saved2" / "latents" / "token_maps" / "step_0000.pt").unlink()
    with pytest.raises(InputError, match=r"token_maps lacks the files of steps \[0\]"):
        Inversion.load(tmp_path / "saved2")
    with pytest.raises(InputError, match="unknown dtype"):
        tiny_pipeline.invert(clip, SOURCE, 2, progress=False, latents_dtype="fp8")


# ---------------------------------------------------------------------------------------------
# chunk_size="auto"
# ---------------------------------------------------------------------------------------------
SD14 = CONFIGS["sd14"]["unet"]


def test_row_bytes_of_sd14():
    chunked = chunking.row_bytes(SD14, (64, 64), 2)
    assert chunked == chunking.WORKING * 64 * 64 * 320 * 2
    # the 12 skip activations of SD-1.4 at 512x512: 6,635,520 values, 13.3 MB per row in fp16
    assert chunking.row_bytes(SD14, (64, 64), 2, chunked=False) - chunked == 6_635_520 * 2


@pytest.mark.parametrize("free_gb,frames,branches,expected", [
    (80, 128, 3, None),   # 3 x 128 rows unchunked: 37.3 GB of a 40 GB budget
    (80, 1024, 3, 158),   # 40e9 // (3 x 83.9 MB)
    (80, 1024, 1, 476),
    (10, 64, 3, 19),
    (0.01, 64, 3, 1),     # not even one frame fits: one frame at a time
    (80, 200, 1, None),
])
def test_auto_chunk_size_from_free_memory(monkeypatch, free_gb, frames, branches, expected):
    monkeypatch.setattr(chunking, "free_device_bytes", lambda device: int(free_gb * 1e9))
    chosen = chunking.auto_chunk_size(SD14, torch.device("cuda"), torch.float16, frames, branches, (64, 64))
    assert chosen == expected


def test_auto_is_all_at_once_on_cpu(tiny_pipeline, clip, host):
    assert chunking.auto_chunk_size(SD14, torch.device("cpu"), torch.float16, 1024, 3, (64, 64)) is None
    auto = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=3, progress=False, chunk_size="auto")
    assert torch.equal(auto.latents, host.latents)
    assert tiny_pipeline.auto_chunk_size(3, 3, (8, 8)) is None


def test_pipeline_caches_the_auto_choice(tiny_pipeline, monkeypatch):
    calls = []

    def fake(config, device, dtype, frames, branches, latent_size):
        calls.append((frames, branches))
        return 2

    monkeypatch.setattr("fatezero_fast.pipeline.auto_chunk_size", fake)
    monkeypatch.setattr(tiny_pipeline, "_auto_chunks", {})
    assert tiny_pipeline.auto_chunk_size(5, 3, (8, 8)) == 2 and tiny_pipeline.auto_chunk_size(5, 3, (8, 8)) == 2
    assert calls == [(5, 3)]


def test_bad_chunk_size(tiny_pipeline, clip):
    for bad in (0, "big", 1.5):
        with pytest.raises(InputError, match="auto"):
            tiny_pipeline.invert(clip, SOURCE, 2, progress=False, chunk_size=bad)
