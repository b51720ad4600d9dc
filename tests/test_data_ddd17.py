"""DDD17 on trees written here in the Ev-SegNet format: ordering, scaling, THL windows, HDF5 packing, errors."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import datalists
from data.ddd17 import DDD17, pack
from data.ddd17.__main__ import main as ddd17_main

# Three recordings, gaps in frame numbers, and numbers whose string order differs from numeric order.
KEYS = [(1487417411, f) for f in (8, 9, 10, 11, 100)] + [(99, f) for f in (1, 2, 3)] + [(1487600000, 7)]


def frame_arrays(key, shape):
    rng = np.random.default_rng(key)
    events = np.zeros(shape + (6,), dtype=np.float32)
    events[..., :2] = rng.poisson(1.5, size=shape + (2,))
    events[..., 2:] = rng.random(shape + (4,))
    events[..., 4] = 0.25  # a constant channel: must scale to 0, not NaN
    label = rng.integers(0, 6, size=shape).astype(np.uint8)
    label[0, 0] = 255
    return events, label


def write_tree(root, split="train", keys=KEYS, shape=(12, 20)):
    (root / "events" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    arrays = {}
    for key in keys:
        events, label = frame_arrays(key, shape)
        name = f"rec{key[0]}_export_{key[1]}"
        np.save(root / "events" / split / f"{name}.npy", events)
        Image.fromarray(label, mode="L").save(root / "labels" / split / f"{name}.png")
        arrays[key] = (events, label)
    return arrays


def hand_scaled(events, channels):
    out = []
    for c in channels:
        v = events[..., c].astype(np.float64)
        out.append((v - v.min()) / (v.max() - v.min()) - 0.5 if v.max() > v.min() else np.zeros_like(v))
    return np.stack(out).astype(np.float32)


@pytest.fixture
def tree(tmp_path):
    return tmp_path, write_tree(tmp_path)


def test_numeric_ordering_and_labels(tree):
    root, arrays = tree
    ds = DDD17(root, "train")
    expected = sorted(KEYS)
    assert [ds.frame_keys(i)[0] for i in range(len(ds))] == expected
    assert expected != sorted(KEYS, key=lambda k: f"rec{k[0]}_export_{k[1]}")  # string order would differ
    for i, key in enumerate(expected):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (2, 12, 20)
        assert y.dtype == torch.int64 and np.array_equal(y.numpy(), arrays[key][1])


def test_scaling_and_channel_choice(tree):
    root, arrays = tree
    for channels in ((0, 1), (5, 2, 4), (0, 1, 2, 3, 4, 5)):
        ds = DDD17(root, "train", channels=channels)
        for i in (0, 4, 8):
            x, _ = ds[i]
            expected = hand_scaled(arrays[ds.frame_keys(i)[0]][0], channels)
            assert np.allclose(x.numpy(), expected, atol=1e-6)
            assert not torch.isnan(x).any() and x.min() >= -0.5 and x.max() <= 0.5
    with pytest.raises(ValueError, match=r"channels must be distinct indices in 0..5, got \[0, 7\]"):
        DDD17(root, "train", channels=(0, 7))


def test_thl_windows_never_cross_gaps_or_recordings(tree):
    root, arrays = tree
    ds = DDD17(root, "train", thl=True, timesteps=3)
    windows = [ds.frame_keys(i) for i in range(len(ds))]
    # by hand: rec 99 frames 1-3 -> target 3; rec 1487417411 frames 8-11 -> targets 10, 11; 100 and 7 isolated
    assert [w[-1] for w in windows] == [(99, 3), (1487417411, 10), (1487417411, 11)]
    assert ds.dropped_targets == len(KEYS) - 3
    for w in windows:
        assert len({rec for rec, _ in w}) == 1 and [f for _, f in w] == list(range(w[0][1], w[0][1] + 3))
    single = DDD17(root, "train")
    x, y = ds[2]
    assert x.shape == (3, 2, 12, 20)
    for t, key in enumerate(windows[2]):
        assert torch.equal(x[t], single[sorted(KEYS).index(key)][0])
    assert np.array_equal(y.numpy(), arrays[(1487417411, 11)][1])


def test_datalist_restricts_and_orders(tree, tmp_path):
    root, _ = tree
    listed = tmp_path / "list.txt"
    listed.write_text("rec99_export_3\nevents/train/rec1487417411_export_9.npy\n\n")
    ds = DDD17(root, "train", datalist=listed)
    assert [ds.frame_keys(i)[0] for i in range(len(ds))] == [(99, 3), (1487417411, 9)]
    assert [ds.frame_keys(i)[-1] for i in range(2)] == [(99, 3), (1487417411, 9)]
    assert [DDD17(root, "train", datalist=listed, thl=True, timesteps=2).frame_keys(i) for i in range(2)] == [
        [(99, 2), (99, 3)],
        [(1487417411, 8), (1487417411, 9)],
    ]
    listed.write_text("".join(f"rec5_export_{i}\n" for i in range(7)))
    with pytest.raises(
        FileNotFoundError,
        match=r"7 entries have no frame.*first: \['rec5_export_0', "
        r"'rec5_export_1', 'rec5_export_2', 'rec5_export_3', 'rec5_export_4'\]",
    ):
        DDD17(root, "train", datalist=listed)
    listed.write_text("frame_12\n")
    with pytest.raises(ValueError, match=r"not named rec<recording>_export_<frame>: \['frame_12'\]"):
        DDD17(root, "train", datalist=listed)


def test_hdf5_round_trip_identical(tree, tmp_path_factory, capsys):
    root, _ = tree
    out = tmp_path_factory.mktemp("packed") / "ddd17-train.h5"
    assert ddd17_main(["pack", str(root), "train", str(out)]) == 0
    assert "packed 9 frames" in capsys.readouterr().out
    for kwargs in (dict(), dict(channels=(5, 1, 3)), dict(thl=True, timesteps=2), dict(img_size=8)):
        folder, packed = DDD17(root, "train", **kwargs), DDD17(out, "train", **kwargs)
        assert isinstance(folder.frames, data.ddd17.FolderFrames)
        assert isinstance(packed.frames, data.ddd17.HDF5Frames)
        assert len(folder) == len(packed)
        for i in range(len(folder)):
            assert folder.frame_keys(i) == packed.frame_keys(i)
            (xf, yf), (xp, yp) = folder[i], packed[i]
            assert torch.equal(xf, xp) and torch.equal(yf, yp)
    out.rename(root / "train.h5")
    found = DDD17(root, "train")  # <root>/train.h5 is preferred
    assert isinstance(found.frames, data.ddd17.HDF5Frames)
    found[0]
    clone = pickle.loads(pickle.dumps(found))  # DataLoader workers reopen the file
    assert clone.frames.file is None and torch.equal(clone[3][0], found[3][0])
    with pytest.raises(ValueError, match="holds split 'train', not 'test'"):
        DDD17(root / "train.h5", "test")


def test_real_shape_resize_and_registry(tmp_path):
    keys = [(1487417411, 5), (1487417411, 6)]
    arrays = write_tree(tmp_path, "test", keys, shape=(200, 346))
    cfg = dict(dataset="ddd17", data_root=str(tmp_path), channels=[0, 1, 2], img_size=None)
    val = data.build_dataset(cfg, "val")  # val reads the test folder
    x, y = val[1]
    assert x.shape == (3, 200, 346) and y.shape == (200, 346)
    assert np.allclose(x.numpy(), hand_scaled(arrays[keys[1]][0], (0, 1, 2)), atol=1e-6)
    x, y = DDD17(tmp_path, "test", img_size=64)[0]
    assert x.shape == (2, 64, 64) and set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    rows = np.floor(np.arange(64) * 200 / 64).astype(int)
    cols = np.floor(np.arange(64) * 346 / 64).astype(int)
    assert np.array_equal(y.numpy(), arrays[keys[0]][1][rows][:, cols])


def test_augment_keeps_labels_valid_and_pairs_aligned(tmp_path):
    write_tree(tmp_path, "train", [(1, 1), (1, 2)], shape=(40, 40))
    torch.manual_seed(0)
    ds = DDD17(tmp_path, "train", augment=True, thl=True, timesteps=2)
    seen_fill = False
    for _ in range(10):
        x, y = ds[0]
        assert x.shape == (2, 2, 40, 40)
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4, 5, 255}
        seen_fill |= bool((y == 255).float().mean() > 0.05)
        assert not torch.isnan(x).any()
    assert seen_fill  # translations/rotations/down-scaling leave label fill (255) at the borders


def test_ddd17_datalists_write_and_check(tmp_path):
    write_tree(tmp_path)
    out = tmp_path / "thl.txt"
    assert (
        datalists.main(
            ["--dataset", "ddd17", "--root", str(tmp_path), "--split", "train", "--out", str(out), "--timesteps", "3"]
        )
        == 0
    )
    assert out.read_text().split() == ["rec99_export_3", "rec1487417411_export_10", "rec1487417411_export_11"]
    assert datalists.main(["--dataset", "ddd17", "--root", str(tmp_path), "--check", str(out), "--deep"]) == 0
    assert datalists.main(["--dataset", "ddd17", "--root", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_error_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist.*events/<split>"):
        DDD17(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="split 'train' not found.*labels/<split>"):
        DDD17(tmp_path, "train")
    write_tree(tmp_path, "train", [(1, 1), (1, 2), (1, 3)])
    events, labels = tmp_path / "events" / "train", tmp_path / "labels" / "train"

    (labels / "rec1_export_3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 event frames .* no label png .*\['rec1_export_3'\]"):
        DDD17(tmp_path, "train")
    (events / "rec1_export_3.npy").unlink()

    (events / "rec1_export_1.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="cannot read event file .*rec1_export_1.npy"):
        DDD17(tmp_path, "train")[0]
    np.save(events / "rec1_export_1.npy", np.zeros((12, 20, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"rec1_export_1.npy has shape \(12, 20, 5\)"):
        DDD17(tmp_path, "train")[0]
    np.save(events / "rec1_export_1.npy", np.zeros((20, 12, 6), dtype=np.float32))
    with pytest.raises(ValueError, match=r"rec1_export_1.npy is \(20, 12\) but its label is \(12, 20\)"):
        DDD17(tmp_path, "train")[0]
    with pytest.raises(ValueError, match=r"rec1_export_1.npy is \(20, 12\) but its label is \(12, 20\)"):
        pack(tmp_path, "train", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()

    label = np.zeros((12, 20), dtype=np.uint8)
    label[3, 3], label[4, 4] = 6, 200
    Image.fromarray(label, mode="L").save(labels / "rec1_export_2.png")
    with pytest.raises(ValueError, match=r"rec1_export_2.png has label values \[6, 200\] outside 0..5"):
        DDD17(tmp_path, "train")[1]
    (labels / "rec1_export_2.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read mask .*rec1_export_2.png"):
        DDD17(tmp_path, "train")[1]
    assert ddd17_main(["pack", str(tmp_path / "missing"), "train", str(tmp_path / "y.h5")]) == 2
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="cannot read HDF5 file .*bad.h5"):
        DDD17(tmp_path / "bad.h5", "train")


def test_non_finite_events_are_named_never_blanked(tmp_path, capsys):
    write_tree(tmp_path, "train", [(1, 1), (1, 2)])
    bad = tmp_path / "events" / "train" / "rec1_export_2.npy"
    events = np.load(bad)
    events[5, 7, 3] = np.nan  # channel 3 is not among the trained channels (0, 1): still corrupt data
    events[0, 0, 1] = np.inf
    np.save(bad, events)
    ds = DDD17(tmp_path, "train")
    ds[0]  # the clean frame reads as before
    with pytest.raises(ValueError, match=r"rec1_export_2.npy holds 2 NaN/inf values \(channels \[1, 3\]\)"):
        ds[1]
    listed = tmp_path / "all.txt"
    listed.write_text("rec1_export_1\nrec1_export_2\n")
    assert datalists.main(["--dataset", "ddd17", "--root", str(tmp_path), "--check", str(listed)]) == 0
    capsys.readouterr()
    assert datalists.main(["--dataset", "ddd17", "--root", str(tmp_path), "--check", str(listed), "--deep"]) == 2
    assert "rec1_export_2.npy holds 2 NaN/inf" in capsys.readouterr().err
    assert ddd17_main(["pack", str(tmp_path), "train", str(tmp_path / "p.h5")]) == 2
    assert "rec1_export_2.npy holds 2 NaN/inf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.txt", "events", "labels"]  # no file, no temp file


def test_packed_file_with_non_finite_events_is_named(tmp_path):
    write_tree(tmp_path, "train", [(1, 1), (1, 2)])
    out = tmp_path / "train.h5"
    pack(tmp_path, "train", out)
    import h5py

    with h5py.File(out, "r+") as f:  # as a file packed before packing checked its frames
        frame = f["events"][1]
        frame[2, 2, 0] = np.nan
        f["events"][1] = frame
    packed = DDD17(out, "train", channels=(0, 1))
    packed[0]
    with pytest.raises(ValueError, match=r"train.h5\[1\] \(rec1_export_2\) holds 1 NaN/inf values \(channels \[0\]\)"):
        packed[1]


def test_events_that_are_not_npy_arrays(tmp_path):
    write_tree(tmp_path, "train", [(1, 1)])
    npy = tmp_path / "events" / "train" / "rec1_export_1.npy"
    npy.write_text("0.1, 0.2, 0.3\n")
    with pytest.raises(ValueError, match="rec1_export_1.npy is not a NumPy .npy array") as err:
        DDD17(tmp_path, "train")[0]
    assert "allow_pickle" not in str(err.value)
    pickle.dump({"events": [1, 2]}, npy.open("wb"))
    with pytest.raises(ValueError, match="is not a NumPy .npy array"):
        DDD17(tmp_path, "train")[0]


def test_pack_output_folders(tmp_path, capsys):
    write_tree(tmp_path / "root", "train", [(1, 1)])
    out = tmp_path / "new" / "folder" / "train.h5"  # a missing folder is created
    assert ddd17_main(["pack", str(tmp_path / "root"), "train", str(out)]) == 0
    assert len(DDD17(out, "train")) == 1
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder would be")
    capsys.readouterr()
    assert ddd17_main(["pack", str(tmp_path / "root"), "train", str(blocker / "train.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"output file {blocker / 'train.h5'} cannot be written: {blocker} is not a folder" in err
    assert ddd17_main(["pack", str(tmp_path / "root"), "train", str(tmp_path)]) == 2  # a folder as output
    assert "it is a folder" in capsys.readouterr().err
