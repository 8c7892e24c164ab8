import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit import UserError
from toolkit.config import load_config
from toolkit.train import data
from toolkit.train.batches import BatchSource, Normalize, TrainPlan, eval_shards


def _folder(root, counts: dict[str, int], size=(12, 10)):
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_without_val_is_a_seeded_stratified_split(tmp_path):
    _folder(tmp_path / "d", {"cat": 20, "dog": 10})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.val_fraction=0.2",
                             "data.image_size=8"])
    a, b = data.load_dataset(cfg.data, seed=1), data.load_dataset(cfg.data, seed=1)
    assert a.classes == ["cat", "dog"]
    assert len(a.val) == 6 and len(a.train) == 24
    assert sorted(a.val.labels.tolist()) == [0, 0, 0, 0, 1, 1]  # 20% of each class
    assert torch.equal(a.val.images, b.val.images)  # same seed, same split
    assert a.train.images.shape == (24, 3, 8, 8) and a.train.images.dtype == torch.uint8
    c = data.load_dataset(cfg.data, seed=2)
    assert not torch.equal(a.val.images, c.val.images)


def test_imagefolder_with_val_maps_classes_by_name(tmp_path):
    _folder(tmp_path / "d" / "train", {"a": 3, "b": 3, "c": 3})
    _folder(tmp_path / "d" / "val", {"c": 2})  # val may lack classes; indices follow train
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=8",
                             "data.cache=stream"])
    ds = data.load_dataset(cfg.data, seed=0)
    assert ds.val.labels.tolist() == [2, 2]
    assert ds.val.files and ds.val.images is None  # cache=stream keeps files, decodes per epoch
    _folder(tmp_path / "d" / "val", {"z": 1})
    with pytest.raises(UserError, match="classes missing from"):
        data.load_dataset(cfg.data, seed=0)


def test_missing_root_is_a_clear_error(tmp_path):
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="data.root '.*nope' does not exist"):
        data.load_dataset(cfg.data, seed=0)


def test_corrupt_training_images_are_skipped_not_fatal(tmp_path):
    _folder(tmp_path / "d", {"a": 5, "b": 5})
    (tmp_path / "d" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=8",
                             "data.val_fraction=0.2"])
    ds = data.load_dataset(cfg.data, seed=0)
    assert len(ds.train) + len(ds.val) == 10


def py2_pickle(obj) -> bytes:
    """What Python 2's cPickle (protocol 2) wrote for the published CIFAR files: bytes keys and strings,
    ints, lists, dicts and 2-D uint8 arrays through numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")

    def string(b):
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v):
        out.extend(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v))

    def write(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                write(k)
                write(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                write(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            integer(o)
        else:  # a (rows, cols) uint8 array: _reconstruct(ndarray, (0,), 'b') then its state
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")
            string(b"b")
            out.extend(b"\x87R(")
            integer(1)
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")
            string(o.tobytes())
            out.extend(b"tb")

    write(obj)
    return bytes(out + b".")


def _write_cifar(root, per_batch=4, test=5, keys="bytes"):
    """A few images in the CIFAR-10 python format (pickled dicts, 3072-byte rows, CHW planes): keys="bytes" as
    the published files (Python 2 pickles); "str" re-packed with Python 3 (protocol 2); "bytes-py3" re-packed
    with Python 3 after reading with the site's recipe, pickle.load(f, encoding='bytes') (protocol 4)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}

    def dump(name, d):
        if keys.startswith("bytes"):
            d = {k.encode(): [v.encode() if isinstance(v, str) else v for v in val] if isinstance(val, list)
                 else val.encode() if isinstance(val, str) else val for k, val in d.items()}
        if keys == "bytes":
            (folder / name).write_bytes(py2_pickle(d))
        else:
            with open(folder / name, "wb") as f:
                pickle.dump(d, f, protocol=2 if keys == "str" else 4)

    def batch(name, n, offset):
        imgs = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        labels = [(offset + i) % 10 for i in range(n)]
        rows = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
        dump(name, {"batch_label": name, "labels": labels, "data": rows,
                    "filenames": [f"{name}_{i}.png" for i in range(n)]})
        expected[name] = (imgs, labels)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch, i)
    batch("test_batch", test, 0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump("batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return expected, names


@pytest.mark.parametrize("keys", ["bytes", "str", "bytes-py3"])
def test_cifar10_real_format(tmp_path, keys):
    expected, names = _write_cifar(tmp_path, keys=keys)
    cfg = load_config(None, ["data.kind=cifar10", f"data.root={tmp_path}", "data.download=false"])
    ds = data.load_dataset(cfg.data, seed=0)
    assert ds.classes == names
    assert len(ds.train) == 20 and len(ds.val) == 5
    imgs, labels = expected["data_batch_1"]
    assert torch.equal(ds.train.images[:4], torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert ds.train.labels[:4].tolist() == labels
    timgs, tlabels = expected["test_batch"]
    assert torch.equal(ds.val.images, torch.from_numpy(timgs).permute(0, 3, 1, 2))
    assert ds.val.labels.tolist() == tlabels

    resized = data.load_dataset(load_config(None, ["data.kind=cifar10", f"data.root={tmp_path}",
                                                   "data.download=false", "data.image_size=40"]).data, 0)
    assert resized.train.images.shape == (20, 3, 40, 40)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_3", "test_batch"])
def test_a_cifar_file_that_names_code_is_refused_without_running_it(tmp_path, victim):
    _write_cifar(tmp_path)
    marker = tmp_path / "ran"
    for protocol in (0, 2, 5):  # GLOBAL and STACK_GLOBAL spellings
        with open(tmp_path / "cifar-10-batches-py" / victim, "wb") as f:
            pickle.dump({"label_names": _Payload(marker), "data": _Payload(marker)}, f, protocol=protocol)
        cfg = load_config(None, ["data.kind=cifar10", f"data.root={tmp_path}", "data.download=false"])
        with pytest.raises(UserError, match=f"{victim}' is refused: it names '(posix|os).system'"):
            data.load_dataset(cfg.data, seed=0)
        assert not marker.exists()


def test_a_cifar_file_with_the_wrong_contents_is_named(tmp_path):
    _write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, f)
    cfg = load_config(None, ["data.kind=cifar10", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(UserError, match="data_batch_2' has no uint8 'data' array"):
        data.load_dataset(cfg.data, seed=0)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02}q")  # torn
    with pytest.raises(UserError, match="data_batch_2' is refused"):
        data.load_dataset(cfg.data, seed=0)


def test_cifar10_missing_without_download(tmp_path):
    cfg = load_config(None, ["data.kind=cifar10", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(UserError, match="CIFAR-10 is not at"):
        data.load_dataset(cfg.data, seed=0)


def _naive_augment(x, shift, flips, pad):
    out = []
    for img, (dy, dx), f in zip(x, shift.tolist(), flips.tolist()):
        p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
        crop = p[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
        out.append(crop.flip(2) if f else crop)
    return torch.stack(out)


def _augment(seed=0, *overrides):
    from toolkit.train.augment import Augment

    return Augment.from_config(load_config(None, list(overrides)).data, seed)


@pytest.mark.parametrize("pad, flip", [(4, True), (0, True), (2, False)])
def test_batch_augmentation_is_crop_with_padding_and_flip(pad, flip):
    x = torch.randint(0, 256, (16, 3, 9, 7), dtype=torch.uint8)
    y = torch.arange(16)
    aug = _augment(0, f"data.crop_padding={pad}", f"data.hflip={flip}").for_epoch(0, 16)
    idx = torch.randperm(16)[:10]  # a batch of samples in any order
    tables = {op.name: t[idx] for op, t in zip(aug.ops, aug.params)}
    shift = tables.get("crop", torch.full((10, 2), pad))
    flips = tables["flip"][:, 0] if flip else torch.zeros(10, dtype=torch.int64)
    want = _naive_augment(x[idx], shift, flips, pad)
    fused, labels = aug.take(x, idx, idx, y[idx])  # the fast path: one gather from the dataset tensor
    assert fused.dtype == torch.uint8 and fused.shape == (10, 3, 9, 7) and torch.equal(labels, y[idx])
    assert torch.equal(fused, want)
    assert torch.equal(aug(x[idx], idx, y[idx])[0], want)  # a decoded batch (streaming source)
    one_by_one = x[idx]
    for op, t in zip(aug.ops, aug.params):  # the ops' own code, one after the other, agrees with the fused gather
        one_by_one, _ = op(one_by_one, y[idx], t[idx])
    assert torch.equal(one_by_one, want)
    if flip:
        assert 0 < flips.sum() < 10  # some flipped, some not


def test_augmentation_draws_are_pinned():
    """The crop and flip draws of a fixed seed: a change here changes how every existing config trains."""
    aug = _augment(7, "data.crop_padding=4").for_epoch(3, 12)
    crop, flip = (t.tolist() for t in aug.params)
    assert crop == [[2, 7], [6, 0], [8, 1], [0, 3], [1, 4], [0, 7], [5, 1], [1, 3], [8, 3], [5, 6], [1, 1], [0, 2]]
    assert [f[0] for f in flip] == [0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0]


def test_each_op_has_its_own_stream():
    from toolkit.train.augment import Augment, HorizontalFlip, Op, RandomCrop

    both = Augment([RandomCrop(4), HorizontalFlip()], seed=7).for_epoch(3, 50).params
    assert torch.equal(Augment([HorizontalFlip()], seed=7).for_epoch(3, 50).params[0], both[1])
    assert torch.equal(Augment([RandomCrop(4)], seed=7).for_epoch(3, 50).params[0], both[0])

    class Extra(Op):  # a new op drawn before the others leaves their draws alone
        name, stream = "extra", 9

        def draw(self, n, g):
            return torch.rand(n, 4, generator=g)

    more = Augment([Extra(), RandomCrop(4), HorizontalFlip()], seed=7).for_epoch(3, 50).params
    assert torch.equal(more[1], both[0]) and torch.equal(more[2], both[1])
    with pytest.raises(ValueError, match="distinct stream ids"):
        Augment([RandomCrop(4), RandomCrop(2)], seed=7)
    assert _augment(0, "data.augment=false") is None


def test_augmentation_is_a_function_of_seed_and_epoch():
    aug = _augment(5)
    a, b = aug.for_epoch(3, 100).params, _augment(5).for_epoch(3, 100).params
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], aug.for_epoch(4, 100).params[0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_covers_every_sample_once_per_epoch(world):
    n, batch = 103, 8
    plans = [TrainPlan(n, batch, world, r, seed=1) for r in range(world)]
    seen = torch.cat([torch.cat(p.batches(epoch=2)) for p in plans])
    assert len(seen) == len(set(seen.tolist()))  # disjoint across processes
    assert len(seen) == (n // world) * world  # only the remainder that cannot be split evenly is left out
    # step k of `world` processes with batch B takes what one process with batch B*world takes
    single = TrainPlan(n, batch * world, 1, 0, seed=1)
    for k, big in enumerate(single.batches(epoch=2)[: plans[0].num_batches]):
        together = torch.cat([p.batches(epoch=2)[k] for p in plans])
        assert sorted(together.tolist()) == sorted(big[: len(together)].tolist())
    assert not torch.equal(plans[0].permutation(2), plans[0].permutation(3))  # reshuffled every epoch


def test_resuming_mid_epoch_gives_the_remaining_batches():
    plan = TrainPlan(50, 4, 2, 1, seed=0, grad_accum=2)
    assert plan.num_batches % 2 == 0
    full = plan.batches(1)
    assert all(torch.equal(a, b) for a, b in zip(full[4:], plan.batches(1, start=4)))


def test_eval_shards_count_each_image_once():
    n = 1001
    seen = torch.cat([torch.cat(eval_shards(n, 2, r, 64)) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(n))


def test_normalize_matches_the_formula():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.2]
    got = Normalize(mean, std)(x)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want)


def test_stream_source_matches_memory_source(tmp_path):
    _folder(tmp_path / "d", {"a": 6, "b": 5}, size=(20, 14))
    args = ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=8", "data.val_fraction=0.2"]
    mem = data.load_dataset(load_config(None, args + ["data.cache=memory"]).data, 0)
    cfg = load_config(None, args + ["data.cache=stream"])
    stream = data.load_dataset(cfg.data, 0)
    src = BatchSource(stream.train, cfg.data, torch.device("cpu"), workers=0)
    idx = [torch.tensor([3, 0, 5]), torch.tensor([1])]
    got = list(src(idx))
    for (x, y), i in zip(got, idx):
        assert torch.equal(x, mem.train.images[i]) and torch.equal(y, mem.train.labels[i])


def test_sampled_streamed_images_keep_their_labels(tmp_path):
    root = tmp_path / "d"
    for cls, value in (("a", 10), ("b", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (value, value, value)).save(root / cls / f"{i}.png")
    (root / "a" / "0.png").write_bytes(b"broken")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8", "data.cache=stream",
                             "data.val_fraction=0.25"])
    split = data.Split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), files=[str(p) for p in sorted(root.rglob("*.png"))])
    px, labels = data.sample_images(split, cfg.data, range(8))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]  # the broken file left with its own label
    assert [int(x[0, 0, 0]) for x in px] == [10, 10, 10, 200, 200, 200, 200]


def test_the_streaming_source_leaves_the_global_rng_alone(tmp_path):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / cls / f"{i}.png")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8", "data.cache=stream",
                             "data.val_fraction=0.34"])
    ds = data.load_dataset(cfg.data, seed=0)
    src = BatchSource(ds.train, cfg.data, torch.device("cpu"), workers=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    list(src([torch.arange(len(ds.train))]))
    assert torch.equal(torch.get_rng_state(), state)  # dropout after a resume draws what it would have drawn


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_only_folders_with_a_usable_training_image_are_classes(tmp_path, cache, caplog):
    root = tmp_path / "d"
    _folder(root / "train", {"a": 4, "b": 3, "broken": 0})
    _folder(root / "val", {"a": 2, "b": 2, "broken": 1})
    for i in range(2):
        (root / "train" / "broken" / f"{i}.png").write_bytes(b"\x89PNG not really")  # no file decodes
    (root / "train" / "__MACOSX" / "a").mkdir(parents=True)  # what unzip leaves from a Mac archive
    (root / "train" / "__MACOSX" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "train" / "emptied").mkdir()
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8", f"data.cache={cache}"])
    with caplog.at_level("INFO", logger="toolkit"):
        ds = data.load_dataset(cfg.data, seed=0)
    assert ds.classes == ["a", "b"]
    assert sorted(ds.train.labels.tolist()) == [0] * 4 + [1] * 3 and sorted(ds.val.labels.tolist()) == [0, 0, 1, 1]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "not classes" in r.getMessage()]
    assert len(warned) == 1  # one warning names them all, with the validation image they take along
    assert all(name in warned[0] for name in ("__MACOSX", "emptied", "broken")) and "1 validation image" in warned[0]


@pytest.mark.parametrize("names, used", [(["val"], "val"), (["valid"], "valid"), (["validation"], "validation"),
                                         (["valid", "test"], "valid"), (["test"], "test")])
def test_validation_folder_names(tmp_path, names, used, caplog):
    root = tmp_path / "d"
    _folder(root / "train", {"x": 6, "y": 6})
    for i, name in enumerate(names):
        _folder(root / name, {"x": 2 + i, "y": 2 + i})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8"])
    with caplog.at_level("INFO", logger="toolkit"):
        ds = data.load_dataset(cfg.data, seed=0)
    assert len(ds.train) == 12 and len(ds.val) == 4 + 2 * names.index(used)  # never a split of train/
    assert ds.val_dir == str(root / used)
    note = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("validation: "))
    assert note.startswith(f"validation: {root / used}/")
    assert ("held out" in note) == ("test" in names and used != "test")


def test_split_folders_are_never_classes_and_two_validation_folders_are_refused(tmp_path, caplog):
    root = tmp_path / "d"
    _folder(root, {"x": 5, "y": 5})  # root/<class>/ next to split folders
    _folder(root / "valid", {"x": 2, "y": 2})
    _folder(root / "test", {"x": 1, "y": 1})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8"])
    ds = data.load_dataset(cfg.data, seed=0)
    assert ds.classes == ["x", "y"] and len(ds.train) == 10 and len(ds.val) == 4
    _folder(root / "val", {"x": 1})
    with pytest.raises(UserError, match="has val/ and valid/: keep one"):
        data.load_dataset(cfg.data, seed=0)


def test_no_image_files_is_an_error_naming_what_was_skipped(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        (tmp_path / "d" / cls / "notes.txt").write_text("x")
        (tmp_path / "d" / cls / "scan.heic").write_bytes(b"x")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"holds no image files .*skipped 4 file\(s\): \.heic 2, \.txt 2"):
        data.load_dataset(cfg.data, seed=0)


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_colour_key_transparency_reaches_training_as_white(tmp_path, cache):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            im = Image.new("RGB", (8, 8), (255, 0, 255))
            im.paste((10, 20, 30), (2, 2, 6, 6))
            im.save(root / cls / f"{i}.png", transparency=(255, 0, 255))  # a tRNS colour key, no alpha band
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=8", f"data.cache={cache}",
                             "data.val_fraction=0.3"])
    ds = data.load_dataset(cfg.data, seed=0)
    x, _ = data.sample_images(ds.train, cfg.data, range(len(ds.train)))
    assert x[:, :, 0, 0].eq(255).all() and x[:, :, 4, 4].tolist() == [[10, 20, 30]] * len(ds.train)


@pytest.mark.parametrize("n, batch, world, accum", [(65, 64, 1, 1), (130, 64, 2, 1), (131, 64, 2, 1), (9, 4, 2, 1),
                                                    (17, 8, 1, 2), (25, 8, 3, 1), (3, 2, 1, 1), (64, 64, 1, 1)])
def test_no_process_ever_gets_a_training_batch_of_one(n, batch, world, accum):
    plans = [TrainPlan(n, batch, world, r, seed=3, grad_accum=accum) for r in range(world)]
    for epoch in (0, 1):
        per_process = [p.batches(epoch) for p in plans]
        assert all(len(b) >= 2 for batches in per_process for b in batches)
        assert len({len(batches) for batches in per_process}) == 1  # every process takes the same number of steps
        seen = torch.cat([torch.cat(batches) for batches in per_process])
        assert len(seen) == len(set(seen.tolist()))
        if plans[0].num_batches * batch < n // world <= plans[0].num_batches * batch + 1:  # the tail of one joined
            assert len(seen) == (n // world) * world  # no image of the epoch is left out
        for p, batches in zip(plans, per_process):  # resume from any batch gives the rest of the epoch
            assert all(torch.equal(a, b) for a, b in zip(batches[1:], p.batches(epoch, start=1)))
    with pytest.raises(UserError, match="at least two images"):
        TrainPlan(3, 8, 2, 0, seed=0)  # one image per process
