"""Image data: decode-once cache, deterministic step batches and augmentation, a
seed-independent content-hash split, fixed validation/probe sets, the three registered
datasets, and one-line errors for bad configs, missing files and odd image sizes."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lit_modules.config_errors import ConfigError
from lit_modules.data import images as images_mod
from lit_modules.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataConfig,
    crop_params,
    image_keys,
    resized_crop,
)
from lit_modules.masking.batches import Images
from lit_modules.paths import Workspace
from lit_modules.registry import DATASETS

SMALL = {"batch_size": 8, "val_batch_size": 16, "val_images": 64}


def _dm(workspace, name="tiny-imagenet", seed=0, max_steps=6, steps_per_epoch=None, **cfg):
    dm = DATASETS.get(name)(ImageDataConfig(name=name, **{**SMALL, **cfg}), 0, seed, max_steps, workspace,
                            steps_per_epoch=steps_per_epoch)
    dm.setup("fit")
    return dm


def _same(a: Images, b: Images) -> bool:
    """Two image batches hold the same tensors (images, keys, labels, index)."""
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("images", "keys", "labels", "index"))


def _pixels_as_batch(dm, index) -> torch.Tensor:
    """The un-augmented images of ``index`` in [0, 1], (B, 3, S, S)."""
    return torch.from_numpy(np.asarray(dm.data.pixels[index.numpy()])).permute(0, 3, 1, 2).float() / 255


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return x * std + mean


def _write_png(path, size, seed, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture(scope="module")
def tiny(session_cache, data_dir):
    """tiny-imagenet decoded once per session (the first decode is timed and printed)."""
    ws = Workspace.resolve(session_cache, data_dir)
    start = time.perf_counter()
    dm = _dm(ws)
    print(f"tiny-imagenet setup (decode or cache hit): {time.perf_counter() - start:.2f} s")
    return dm


# ---------------------------------------------------------------- config and registry


def test_registered_datasets_use_the_image_config():
    for name in ("tiny-imagenet", "cifar10", "image-folder"):
        entry = DATASETS.get(name)
        assert entry.Config is ImageDataConfig and entry.Config.kind == "image"


@pytest.mark.parametrize("field,value", [
    ("image_size", -1), ("batch_size", 0), ("val_batch_size", 0), ("val_fraction", 0.0),
    ("val_fraction", 1.0), ("val_images", -1), ("crop_scale_min", 0.0), ("crop_scale_min", 1.5),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError) as e:
        ImageDataConfig(**{field: value})
    assert e.value.field == field and "\n" not in str(e.value)


# ---------------------------------------------------------------- tiny-imagenet


def test_tiny_imagenet_shapes_dtypes_and_info(tiny):
    assert tiny.num_classes == 200 and tiny.image_size == 64 and len(tiny.class_names) == 200
    assert isinstance(tiny.data.pixels, np.memmap) and tiny.data.pixels.shape == (10_000, 64, 64, 3)
    info = tiny.info
    assert info["data.n_images"] == 10_000
    assert info["data.n_train"] + info["data.n_val_split"] == 10_000
    assert info["data.n_val"] == 64 and info["data.resolution"] == 64
    assert all(k.startswith("data.") for k in info)
    for batch in (tiny.train_dataloader().dataset[0], next(iter(tiny.val_dataloader()))):
        b = len(batch.labels)
        assert batch.images.shape == (b, 3, 64, 64) and batch.images.dtype == torch.float32
        assert isinstance(batch, Images) and batch.grid is None  # no plan: the model sets the grid
        for k in ("labels", "keys", "index"):
            assert getattr(batch, k).shape == (b,) and getattr(batch, k).dtype == torch.int64
        assert batch.labels.min() >= 0 and batch.labels.max() < 200
        lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        per_channel = batch.images.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    assert len(tiny.train_dataloader().dataset[0].labels) == 8


def test_labels_match_the_source(tiny, data_dir):
    with np.load(data_dir / "tiny-imagenet-200-val/tiny_imagenet_200_val.npz") as z:
        labels = z["labels"].astype(np.int64)
    batch = next(iter(tiny.val_dataloader()))
    assert torch.equal(batch.labels, torch.from_numpy(labels[batch.index.numpy()]))


def test_decode_is_cached(tiny, workspace, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(images_mod, "_decode_all", no_decode)
    again = _dm(workspace, seed=5)
    assert again.info["data.cache_file"] == tiny.info["data.cache_file"]
    assert (workspace.cache_dir / "images" / tiny.info["data.cache_file"]).is_file()
    assert np.array_equal(again.data.keys, tiny.data.keys)


def test_validation_is_fixed_unaugmented_and_spread(tiny):
    idx = tiny.val_index
    assert len(idx) == 64 and np.all(np.diff(idx) > 0) and np.isin(idx, tiny.val_split).all()
    # Evenly spread over the split, not its first 64 images.
    assert idx[-1] == tiny.val_split[-1] and idx[0] == tiny.val_split[0]
    batches = list(tiny.val_dataloader())
    assert [len(b.index) for b in batches] == [16] * 4
    got = torch.cat([b.index for b in batches])
    assert torch.equal(got, torch.from_numpy(idx))
    first = batches[0]
    assert torch.allclose(_denormalize(first.images), _pixels_as_batch(tiny, first.index), atol=1e-5)
    again = next(iter(tiny.val_dataloader()))
    assert _same(first, again)


def test_split_is_seed_independent_disjoint_and_nested(tiny, workspace):
    other = _dm(workspace, seed=123)
    assert np.array_equal(other.train_index, tiny.train_index)
    assert np.array_equal(other.val_split, tiny.val_split)
    assert len(np.intersect1d(tiny.train_index, tiny.val_split)) == 0
    assert len(tiny.train_index) + len(tiny.val_split) == 10_000
    assert 0.08 < len(tiny.val_split) / 10_000 < 0.12
    bigger = _dm(workspace, val_fraction=0.2)
    assert np.isin(tiny.val_split, bigger.val_split).all() and len(bigger.val_split) > len(tiny.val_split)


def test_train_batch_is_a_function_of_seed_and_step(tiny, workspace):
    other = _dm(workspace)
    a, b = tiny.train_dataloader().dataset, other.train_dataloader().dataset
    for step in (0, 3):
        x, y = a[step], b[step]
        assert _same(x, y)
    assert not torch.equal(a[0].index, a[1].index)
    reseeded = _dm(workspace, seed=1).train_dataloader().dataset
    assert not torch.equal(a[0].index, reseeded[0].index)
    assert not torch.equal(a[0].images, reseeded[0].images)
    for step in range(4):
        assert np.isin(a[step].index.numpy(), tiny.train_index).all()


def test_augmentation_depends_on_row_not_batch_size(tiny, workspace):
    """Row r of step s: same image and same crop whatever the batch size."""
    wide = _dm(workspace, batch_size=16).train_dataloader().dataset[2]
    narrow = tiny.train_dataloader().dataset[2]
    assert torch.equal(wide.index[:8], narrow.index)
    assert torch.equal(wide.images[:8], narrow.images)


def test_keys_are_content_keys(tiny):
    ds = tiny.train_dataloader().dataset
    seen: dict[int, int] = {}
    for step in range(6):
        batch = ds[step]
        assert torch.equal(batch.keys, torch.from_numpy(image_keys(tiny.data.pixels[batch.index.numpy()])))
        for i, k in zip(batch.index.tolist(), batch.keys.tolist()):
            assert seen.setdefault(i, k) == k
    assert len(set(tiny.data.keys.tolist())) == len(tiny.data.keys)  # no two images share a key
    val = next(iter(tiny.val_dataloader()))
    assert torch.equal(val.keys, torch.from_numpy(tiny.data.keys[val.index.numpy()]))


def test_train_loader_serves_every_step_in_order(workspace, tiny):
    dm = _dm(workspace, max_steps=5, steps_per_epoch=2)
    loader = dm.train_dataloader()
    batches = []
    for epoch in range(math.ceil(dm.max_steps / dm.steps_per_epoch)):
        loader.sampler.set_epoch(epoch)
        batches.extend(loader)
    assert len(batches) == 5
    for step, batch in enumerate(batches):
        assert torch.equal(batch.images, loader.dataset[step].images)


def test_unaugmented_unnormalized_train_batch_is_the_pixels(workspace, tiny):
    batch = _dm(workspace, augment=False, normalize=False).train_dataloader().dataset[1]
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert torch.equal(batch.images, _pixels_as_batch(tiny, batch.index))


def test_probe_loaders_are_fixed_and_unaugmented(tiny):
    train, val = tiny.probe_dataloaders(train_images=40, batch_size=16)
    tb = list(train)
    idx = torch.cat([b.index for b in tb])
    assert len(idx) == 40 and np.isin(idx.numpy(), tiny.train_index).all()
    assert torch.allclose(_denormalize(tb[0].images), _pixels_as_batch(tiny, tb[0].index), atol=1e-5)
    assert torch.equal(torch.cat([b.index for b in val]), torch.from_numpy(tiny.val_index))
    assert torch.equal(torch.cat([b.index for b in tiny.probe_dataloaders(40, 16)[0]]), idx)


# ---------------------------------------------------------------- crop and flip


def test_crop_params_follow_random_resized_crop():
    u = torch.rand(4096, 41)
    boxes, flips = crop_params(u, 64, 0.2)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 64).all() and (y0 + h <= 64).all()
    area = (w * h).float() / 64**2
    assert area.min() > 0.18 and area.max() <= 1.0  # scale (0.2, 1) up to rounding
    ratio = w.float() / h.float()
    assert ratio.min() > 0.7 and ratio.max() < 1.45
    assert 0.45 < flips.float().mean() < 0.55
    # scale_min = 1 and aspect ratio 1 (u = 0.5 in log space): the whole image.
    whole = torch.full((3, 41), 0.5)
    boxes, _ = crop_params(whole, 64, 1.0)
    assert boxes.tolist() == [[0, 0, 64, 64]] * 3


def test_resized_crop_matches_interpolate_per_image():
    x = torch.rand(6, 3, 32, 32)
    boxes, flips = crop_params(torch.rand(6, 41), 32, 0.2)
    got = resized_crop(x, boxes, flips)
    for k in range(6):
        x0, y0, w, h = boxes[k].tolist()
        ref = F.interpolate(x[k : k + 1, :, y0 : y0 + h, x0 : x0 + w], size=(32, 32), mode="bilinear",
                            align_corners=False, antialias=True)[0]
        ref = ref.flip(-1) if flips[k] else ref
        assert torch.allclose(got[k], ref, atol=1e-5)
    full = torch.tensor([[0, 0, 32, 32]] * 6)
    assert torch.allclose(resized_crop(x, full, torch.zeros(6, dtype=torch.bool)), x, atol=1e-6)
    assert torch.allclose(resized_crop(x, full, torch.ones(6, dtype=torch.bool)), x.flip(-1), atol=1e-6)


# ---------------------------------------------------------------- other datasets


def test_cifar10_at_32(workspace):
    dm = _dm(workspace, name="cifar10")
    assert dm.image_size == 32 and dm.num_classes == 10 and dm.class_names[0] == "airplane"
    batch = dm.train_dataloader().dataset[0]
    assert batch.images.shape == (8, 3, 32, 32)
    assert batch.labels.min() >= 0 and batch.labels.max() < 10
    assert next(iter(dm.val_dataloader())).images.shape == (16, 3, 32, 32)


def test_image_folder_with_class_subfolders(tmp_path, data_dir):
    root = tmp_path / "imgs"
    for c, cls in enumerate(("cat", "dog")):
        for i in range(8):
            _write_png(root / cls / f"{i}.png", (16, 16), seed=10 * c + i, mode="L" if i == 0 else "RGB")
    (root / ".hidden").mkdir()
    _write_png(root / ".hidden" / "x.png", (5, 7), seed=99)  # skipped: hidden
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    dm = _dm(ws, name="image-folder", path=str(root), val_fraction=0.5)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"] and dm.image_size == 16
    assert dm.info["data.n_images"] == 16 and len(dm.train_index) and len(dm.val_split)
    assert dm.data.labels.tolist() == [0] * 8 + [1] * 8
    batch = dm.train_dataloader().dataset[0]
    assert batch.images.shape == (8, 3, 16, 16) and set(batch.labels.tolist()) <= {0, 1}
    # Resizing: a new cache entry, same split (it hashes the files, not the pixels).
    big = _dm(ws, name="image-folder", path=str(root), val_fraction=0.5, image_size=24)
    assert big.image_size == 24 and big.info["data.cache_file"] != dm.info["data.cache_file"]
    assert np.array_equal(big.val_split, dm.val_split)


def test_image_folder_over_the_cache_limit_decodes_on_the_fly_in_the_workers(tmp_path, data_dir):
    """Over data.cache_limit_gb: no pixel cache is written, each batch is decoded where it
    is assembled (the same pixels as the cache gives), the mask keys hash the encoded
    files, and batches and masks are the same at 0 and 2 workers."""
    import hashlib

    from lit_modules.data.images import DecodedOnRead
    from lit_modules.data.loading import Loading
    from lit_modules.masking.plan import MaskPlan
    from lit_modules.registry import MASKINGS

    root = tmp_path / "imgs"
    for c, cls in enumerate(("cat", "dog")):
        for i in range(12):
            _write_png(root / cls / f"{i}.png", (20, 20), seed=10 * c + i)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    cached = _dm(ws, name="image-folder", path=str(root), val_fraction=0.25, image_size=16)
    limit = 24 * 16 * 16 * 3 / 1e9 * 0.99  # just under the 24 decoded images
    lazy = _dm(ws, name="image-folder", path=str(root), val_fraction=0.25, image_size=16, cache_limit_gb=limit)
    assert isinstance(lazy.data.pixels, DecodedOnRead) and lazy.info["data.pixels"].startswith("decoded on the fly")
    assert lazy.info["data.cache_file"] == "" and cached.info["data.pixels"].startswith("cached")
    assert sorted(p.name for p in (ws.cache_dir / "images").iterdir()) == sorted(  # only the cached run's files
        [cached.info["data.cache_file"], cached.info["data.cache_file"].replace(".npy", ".keys.npy")])
    assert np.array_equal(lazy.val_split, cached.val_split) and lazy.image_size == 16
    for step in (0, 3):
        a, b = cached.train_dataloader().dataset[step], lazy.train_dataloader().dataset[step]
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)  # same pixels, same crops
    files = sorted(root.rglob("*.png"), key=lambda p: p.relative_to(root).as_posix())
    expected = [int.from_bytes(hashlib.blake2b(f.read_bytes(), digest_size=8, person=b"masklab-key-enc").digest(),
                               "little", signed=True) for f in files]
    assert lazy.data.keys.tolist() == expected
    lazy.plan = MaskPlan(seed=0, train=MASKINGS.get("mae-random")(mask_ratio=0.5), grid=(4, 4), steps_per_epoch=6,
                         masked_steps=(0, 5))
    runs = []
    for workers in (0, 2):
        lazy.loading = Loading(workers=workers)
        runs.append([(item.batch.images, item.batch.keys, item.masked.loss_mask) for item in lazy.train_dataloader()])
    assert len(runs[0]) == 6
    assert all(torch.equal(x, y) for r0, r2 in zip(*runs) for x, y in zip(r0, r2))


def test_image_folder_without_subfolders_has_one_class(tmp_path, data_dir):
    for i in range(6):
        _write_png(tmp_path / "flat" / f"{i}.jpg", (8, 8), seed=i)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    dm = _dm(ws, name="image-folder", path=str(tmp_path / "flat"), val_fraction=0.5)
    assert dm.num_classes == 1 and dm.data.labels.tolist() == [0] * 6 and dm.image_size == 8


# ---------------------------------------------------------------- errors


def _error(fn) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        fn()
    assert "\n" not in str(e.value)
    return e.value


def test_missing_file_names_the_path(tmp_path):
    ws = Workspace.resolve(tmp_path / "out", tmp_path / "empty")
    e = _error(lambda: _dm(ws))
    assert e.field == "data.path" and "tiny_imagenet_200_val.npz" in str(e) and "MASKLAB_DATA_DIR" in str(e)
    e = _error(lambda: _dm(ws, name="image-folder"))
    assert e.field == "data.path" and "required" in str(e)
    (tmp_path / "empty").mkdir()
    e = _error(lambda: _dm(ws, name="image-folder", path=str(tmp_path / "empty")))
    assert e.field == "data.path" and "no image files" in str(e)


def test_non_square_images_need_an_image_size(tmp_path, data_dir):
    for i in range(4):
        _write_png(tmp_path / "wide" / f"{i}.png", (24, 16), seed=i)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    e = _error(lambda: _dm(ws, name="image-folder", path=str(tmp_path / "wide"), val_fraction=0.5))
    assert e.field == "data.image_size" and "not square" in str(e) and "e.g. 16" in str(e)
    dm = _dm(ws, name="image-folder", path=str(tmp_path / "wide"), val_fraction=0.5, image_size=16)
    assert dm.image_size == 16 and dm.data.pixels.shape == (4, 16, 16, 3)


def test_mixed_sizes_need_an_image_size(tmp_path, data_dir):
    _write_png(tmp_path / "mixed" / "a.png", (16, 16), seed=0)
    _write_png(tmp_path / "mixed" / "b.png", (32, 32), seed=1)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    e = _error(lambda: _dm(ws, name="image-folder", path=str(tmp_path / "mixed"), val_fraction=0.5))
    assert e.field == "data.image_size" and "differ in size" in str(e)
    assert not list((ws.cache_dir / "images").glob("*"))  # no partial cache left behind


def test_mixing_top_level_images_and_subfolders_is_an_error(tmp_path, data_dir):
    _write_png(tmp_path / "m" / "a.png", (8, 8), seed=0)
    _write_png(tmp_path / "m" / "cls" / "b.png", (8, 8), seed=1)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    e = _error(lambda: _dm(ws, name="image-folder", path=str(tmp_path / "m")))
    assert e.field == "data.path" and "class subfolder" in str(e)


def test_a_split_left_empty_is_an_error(tmp_path, data_dir):
    _write_png(tmp_path / "one" / "a.png", (8, 8), seed=0)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    e = _error(lambda: _dm(ws, name="image-folder", path=str(tmp_path / "one")))
    assert e.field == "data.val_fraction"
