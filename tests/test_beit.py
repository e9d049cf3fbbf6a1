"""The patch tokenizer (k-means visual words) and the BEiT family: determinism, the cache,
reconstruction against the mean patch, the loss only at masked patches, the encoder blind
to masked pixels. (Registry smoke, layer removal, FLOPs, bf16 and the data pipeline are
the registry-parametrized tests of every family.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_modules import patch_tokenizer as pt
from lit_modules.config_errors import ConfigError


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10's decoded training and held-out images (uint8, 32 x 32) and their keys."""
    from lit_modules.config import load_run_config
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    from .conftest import TINY, shared_data_dir

    ws = Workspace.resolve(tmp_path_factory.mktemp("beit"), shared_data_dir())
    dm = build_datamodule(load_run_config(TINY["beit"]), ws)
    train = dm.train_index[:400]
    return dm.data.pixels[train], dm.data.keys[train], dm.data.pixels[dm.val_index]


OPTIONS = pt.TokenizerOptions(codebook_size=32, patch_size=8, max_patches=4000, iterations=10, seed=0)


def test_tokenizer_is_deterministic_and_beats_the_mean_patch(cifar):
    """Two fits of the same data and options give the same codebook bit for bit; its
    reconstruction PSNR is above the mean patch's, and its words are used."""
    pixels, keys, held_out = cifar
    a = pt.fit(pixels, keys, held_out, OPTIONS, None)
    b = pt.fit(pixels, keys, held_out, OPTIONS, None)
    assert torch.equal(a.centroids, b.centroids) and a.stats == b.stats
    assert a.stats["psnr"] > a.stats["psnr_mean_patch"] + 3.0, a.stats  # 3 dB: a factor 2 in MSE
    assert 8 < a.stats["perplexity"] <= 32
    other = pt.fit(pixels, keys, held_out, pt.TokenizerOptions(**{**OPTIONS.__dict__, "seed": 1}), None)
    assert not torch.equal(a.centroids, other.centroids)


def test_tokenizer_cache_hit(cifar, tmp_path, monkeypatch):
    """The second fit of the same (data, options) loads the cached codebook: k-means does
    not run again, and the codebook and scores are the same."""
    pixels, keys, held_out = cifar
    first = pt.fit(pixels, keys, held_out, OPTIONS, tmp_path)
    assert len(list((tmp_path / "patch-tokenizer").glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("k-means ran on a cache hit")

    monkeypatch.setattr(pt, "kmeans", refuse)
    second = pt.fit(pixels, keys, held_out, OPTIONS, tmp_path)
    assert torch.equal(first.centroids, second.centroids) and first.stats == pytest.approx(second.stats)
    with pytest.raises(AssertionError, match="cache hit"):  # other data: a new fit
        pt.fit(pixels[:-1], keys[:-1], held_out, OPTIONS, tmp_path)


def test_encode_decode_round_trip():
    """A token decodes to its centroid; an image made of centroids encodes to their ids."""
    centroids = torch.rand(5, 3 * 4 * 4)
    tok = pt.PatchTokenizer(centroids, 4, {})
    ids = torch.randint(0, 5, (2, 16))
    images = tok.decode(ids, (4, 4))  # (2, 3, 16, 16)
    assert torch.equal(tok.encode(images), ids)


# ---------------------------------------------------------------- BEiT


def _beit(tiny_config, workspace):
    from lit_modules.run import build_datamodule, build_model

    cfg = tiny_config("beit")
    dm = build_datamodule(cfg, workspace)
    return build_model(cfg, dm), dm


def test_loss_only_at_masked_patches(tiny_config, workspace):
    """Moving the hidden states (so the predictions) at visible patches leaves the loss
    unchanged, bit for bit; moving one masked patch's changes it."""
    from lit_modules.masking.attention import Attention

    model, dm = _beit(tiny_config, workspace)
    masked = next(iter(dm.train_dataloader())).masked
    h = model.model.embed(masked.inputs, masked.loss_mask)
    for block in model.blocks:
        h = block(h, Attention())
    base = model._masked_ce(h, masked)[0]
    visible = torch.cat([torch.zeros_like(masked.loss_mask[:, :1]), ~masked.loss_mask], dim=1)  # [cls] too
    moved = h + 5.0 * torch.randn_like(h) * visible[..., None]
    assert torch.equal(model._masked_ce(moved, masked)[0], base)
    one = torch.zeros_like(visible)
    b, n = torch.nonzero(masked.loss_mask)[0].tolist()
    one[b, 1 + n] = True
    assert model._masked_ce(h + 5.0 * torch.randn_like(h) * one[..., None], masked)[0] != base  # (a constant shift the norm would undo)


def test_encoder_never_reads_masked_pixels(tiny_config, workspace):
    """The encoder's output is unchanged when the pixels of masked patches change (their
    embeddings are the [MASK] embedding); the targets do change."""
    from lit_modules.masking.attention import Attention
    from lit_modules.patchify import patchify, unpatchify

    model, dm = _beit(tiny_config, workspace)
    masked = next(iter(dm.train_dataloader())).masked
    p, grid = model.run_config.model.patch_size, model.run_config.model.grid
    patches = patchify(masked.inputs, p)
    scribbled = unpatchify(torch.where(masked.loss_mask[..., None], torch.randn_like(patches), patches), p, grid)

    def encode(images):
        h = model.model.embed(images, masked.loss_mask)
        for block in model.blocks:
            h = block(h, Attention())
        return h

    assert torch.equal(encode(scribbled), encode(masked.inputs))
    assert not torch.equal(model.targets(scribbled), model.targets(masked.inputs))


def test_tokenizer_scores_are_run_params_and_a_model_without_it_refuses(tiny_config, workspace):
    from lit_modules.run import build_model

    model, dm = _beit(tiny_config, workspace)
    params = model.run_params()
    assert params["tokenizer.psnr"] > params["tokenizer.psnr_mean_patch"]
    assert 1 <= params["tokenizer.perplexity"] <= 16
    bare = build_model(tiny_config("beit"))
    item = next(iter(dm.train_dataloader()))
    with pytest.raises(RuntimeError, match="patch tokenizer is not fit"):
        bare._shared_step(item, "train")


@pytest.mark.parametrize("over,field", [
    ({"model.codebook_size": 1}, "model.codebook_size"),
    ({"model.tokenizer_patches": 8}, "model.tokenizer_patches"),
    ({"model.image_size": 30}, "model.image_size"),
])
def test_bad_beit_settings_are_one_line_errors(tiny_config, over, field):
    with pytest.raises(ConfigError) as e:
        tiny_config("beit", over)
    assert str(e.value).startswith(f"{field} = ") and "\n" not in str(e.value)


def test_tokenizer_fits_the_data_module_images():
    """The training patches are the hash-smallest images', in dataset order."""
    pixels = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    keys = np.arange(10)[::-1].copy()
    options = pt.TokenizerOptions(codebook_size=4, patch_size=8, max_patches=8, iterations=2)
    tok = pt.fit(pixels, keys, pixels[:2], options, None)
    # 8 patches = 2 images of 4 patches: the two with the smallest keys, in key order (9, then 8)
    x = pt.patchify(torch.from_numpy(pixels[[9, 8]]).permute(0, 3, 1, 2).float() / 255, 8).reshape(-1, 192)
    assert torch.equal(tok.centroids, pt.kmeans(x, 4, 2, 0))
    shuffled = np.random.default_rng(1).permutation(10)  # the same images in another order: the same codebook
    assert torch.equal(pt.fit(pixels[shuffled], keys[shuffled], pixels[:2], options, None).centroids, tok.centroids)


def test_targets_are_the_tokenizers_words_under_autocast(tiny_config, workspace):
    """bf16 autocast (the default on GPUs) does not change which word a patch gets."""
    model, dm = _beit(tiny_config, workspace)
    images = next(iter(dm.train_dataloader())).masked.inputs
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = model.targets(images)
    assert torch.equal(under, model.targets(images))


def test_video_tokens_from_a_pixel_dataset(workspace):
    """data.source tokenizes Moving-MNIST with the patch tokenizer: ids in [0, K) on the
    (frames, S / P, S / P) grid, the pixel dataset's splits, the tokenizer's scores in the
    run's params, and the same ids from the cache the second time."""
    from lit_modules.data.configs import VideoDataConfig
    from lit_modules.data.video import MovingMnist, VideoTokens

    common = dict(frames=4, image_size=32, n_clips=40, batch_size=2, val_batch_size=4)
    cfg = VideoDataConfig(name="video-tokens", clip_kind="tokens", source="moving-mnist", vocab_size=16,
                          token_patch=8, **common)
    dm = VideoTokens(cfg, 0, 0, 4, workspace)
    dm.setup()
    ids = np.asarray(dm.data.clips)
    assert ids.shape == (40, 4, 4, 4) and ids.min() >= 0 and ids.max() < 16
    pixels = MovingMnist(VideoDataConfig(name="moving-mnist", **common), 0, 0, 4, workspace)
    pixels.setup()
    assert np.array_equal(dm.train_index, pixels.train_index) and np.array_equal(dm.val_split, pixels.val_split)
    assert dm.info["data.tokenizer.psnr"] > dm.info["data.tokenizer.psnr_mean_patch"]
    again = VideoTokens(cfg, 0, 0, 4, workspace)
    again.setup()
    assert np.array_equal(np.asarray(again.data.clips), ids)
    item = next(iter(dm.train_dataloader()))
    assert item.clips.dtype == torch.int64 and item.clips.shape == (2, 4, 4, 4)


def test_video_tokens_source_errors():
    from lit_modules.data.configs import VideoDataConfig

    with pytest.raises(ConfigError, match="source = 'bbb': tokenizes a pixel dataset"):
        VideoDataConfig(name="video-tokens", clip_kind="tokens", source="bbb", path="x.npy", vocab_size=16)
    with pytest.raises(ConfigError, match="token_patch = 6"):
        VideoDataConfig(name="video-tokens", clip_kind="tokens", source="bbb", vocab_size=16, token_patch=6)
