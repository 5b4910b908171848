"""Datasets from disk: the ImageNet layout streamed through a DataLoader, the validation split, and
the errors a bad folder gets."""

import collections
import contextlib
import os
import pickle
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BIN, all_processes, image_folder, tiny_spec
from PIL import Image
from torch import Tensor
from typer.testing import CliRunner

from sharetune.cli import app
from sharetune.data import Augment, DataError, ImageFolderData, Preprocessing, load, stratified_split
from sharetune.data.batches import epoch_order
from sharetune.models import create_model
from sharetune.recipes import Recipe
from sharetune.spaces import parse_spec
from sharetune.trainables.preflight import check_search
from sharetune.training import train_epochs

CPU = torch.device("cpu")


def test_the_val_split_is_exact_stratified_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert collections.Counter(labels[val].tolist()) == {0: 5, 1: 3, 2: 2}
    assert not set(train.tolist()) & set(val.tolist()) and sorted([*train.tolist(), *val.tolist()]) == list(range(100))
    assert torch.equal(stratified_split(labels, 0.1, seed=3)[1], val) and not torch.equal(stratified_split(labels, 0.1, seed=4)[1], val)
    data = load("synthetic", val_fraction=0.25)
    assert len(data.x_val) + len(data.x_train) == 512 and data.splits() == ("val", "test")


def test_a_folder_streams_its_splits_in_a_seeded_order(tmp_path):
    data = load("imagefolder", image_folder(tmp_path), img_size=16, val_fraction=0.25, seed=1)
    assert isinstance(data, ImageFolderData) and data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert data.class_names() == ["class_0", "class_1", "class_2"]  # an exported model's outputs, by name
    lists = data._lists()
    assert [len(lists[s]) for s in ("train", "val", "test")] == [54, 18, 24]
    assert collections.Counter(label for _, label in lists["val"]) == {0: 6, 1: 6, 2: 6}
    assert not {p for p, _ in lists["val"]} & {p for p, _ in lists["train"]}
    first = [y.tolist() for _, y in data.train_batches(2, 8, seed=5, device=CPU, workers=2)]
    again = [y.tolist() for _, y in load("imagefolder", tmp_path, img_size=16, val_fraction=0.25, seed=1).train_batches(2, 8, seed=5, device=CPU)]
    assert first == again  # a resumed trial sees the same batches, whatever the loader's workers
    assert first != [y.tolist() for _, y in data.train_batches(3, 8, seed=5, device=CPU, workers=2)]
    x, _ = next(data.eval_batches("test", CPU))
    assert x.shape == (24, 3, 16, 16) and data.with_resolution(24).input_shape == (3, 24, 24)
    subset = load("imagefolder", tmp_path, train_subset=9, test_subset=6, val_fraction=0)._lists()
    assert collections.Counter(label for _, label in subset["train"]) == {0: 3, 1: 3, 2: 3}  # every class alike
    assert collections.Counter(label for _, label in subset["test"]) == {0: 2, 1: 2, 2: 2}


def test_the_recorded_preprocessing_makes_from_an_image_file_exactly_what_evaluation_reads(tmp_path):
    """What an exported model carries (timm's evaluation transform as plain values) turns each image
    file, at another size than the trial's, into the tensor the trial evaluated."""
    data = load("imagefolder", image_folder(tmp_path, size=23), img_size=16)
    how = Preprocessing.from_dict(data.preprocessing.as_dict())
    assert (how.mode, how.resize, how.crop, how.interpolation, how.size) == ("RGB", 18, 16, "bilinear", (16, 16))  # crop_pct 0.875
    assert how.mean == pytest.approx((0.485, 0.456, 0.406)) and how.std == pytest.approx((0.229, 0.224, 0.225))
    evaluated = torch.cat([x for x, _ in data.eval_batches("test", CPU)])
    files = [path for path, _ in data._lists()["test"]]
    assert torch.equal(torch.stack([how(Image.open(path)) for path in files]), evaluated)
    assert data.with_resolution(24).preprocessing.crop == 24


def test_sharetune_train_decodes_a_folder_in_loader_processes_as_a_trial_does(tmp_path):
    """A trial's loader takes its CPUs; `sharetune train` the machine's, not its main process alone
    (forked DataLoader workers: children with the command's own command line)."""
    root = image_folder(tmp_path / "images", per_class=40)
    process = subprocess.Popen([str(BIN / "sharetune"), "train", "spin", "--dataset", "imagefolder", "--data-dir", str(root),
                                "--dim", "8", "--depth", "2", "--patch-size", "4", "--kernel-size", "3", "--img-size", "16",
                                "--epochs", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command, loaders = None, set()
    while process.poll() is None:
        with contextlib.suppress(OSError):
            command = command or Path(f"/proc/{process.pid}/cmdline").read_bytes()
            for pid, (parent, _) in all_processes().items():
                if parent == process.pid and Path(f"/proc/{pid}/cmdline").read_bytes() == command:
                    loaders.add(pid)
        time.sleep(0.05)
    assert process.returncode == 0, process.stderr.read()
    assert len(loaders) >= 2  # the training and the evaluation loaders' workers, each of their own


def test_images_stored_smaller_than_they_are_decoded_get_a_note_from_train_and_search(tmp_path):
    """A walk's 32-pixel images trained at the default 224: 49 times the compute, and not a word."""
    root = image_folder(tmp_path / "images", size=16)
    data = load("imagefolder", root, img_size=64)
    note = f"{root}: its images are 16 x 16 (the first one), decoded at 64 x 64: 16 times the pixels to compute; img_size 16 trains at their size"
    assert data.upscaling_note() == note and data.upscaling_note([16, None]) == note  # the largest a trial decodes at
    assert data.with_resolution(16).upscaling_note() is None and data.upscaling_note([16]) is None
    assert load("synthetic").upscaling_note() is None  # the sets in memory are used at their size
    trained = CliRunner().invoke(app, ["train", "spin", "--dataset", "imagefolder", "--data-dir", str(root), "--dim", "8", "--depth", "1",
                                       "--patch-size", "8", "--img-size", "32", "--epochs", "1", "--json"])
    assert trained.exit_code == 0 and trained.stderr == (f"note: {root}: its images are 16 x 16 (the first one), decoded at 32 x 32: "
                                                         "4 times the pixels to compute; img_size 16 trains at their size (--img-size)\n")
    # ArbNet's train has the option the note names too (it named it, and had none): decoded at their size, no note
    trained = CliRunner().invoke(app, ["train", "arbnet", "--dataset", "imagefolder", "--data-dir", str(root), "--img-size", "16",
                                       "--table-size", "64", "--epochs", "1", "--json"])
    assert trained.exit_code == 0 and trained.stderr == "", trained.output
    spec = parse_spec(tiny_spec(family="spin", data={"name": "imagefolder", "root": str(root), "img_size": 16},
                                fixed={"epochs": 1, "dim": 8, "depth": 1, "patch_size": 4}, dimensions={"img_size": {"choice": [16, 32]}}))
    with pytest.warns(UserWarning, match=r"decoded at 32 x 32: 4 times .* \(data.img_size, or a SPIN trial's img_size\)$"):
        check_search(spec, load(**spec.data.model_dump()))


def test_an_images_augmentation_depends_on_the_seed_the_epoch_and_the_image_alone(tmp_path):
    """A resumed trial's persistent loader workers start at its epoch, trials get different numbers of
    them, and the ranks of a data-parallel trial each decode a share: each used to draw its own
    augmentations (RandAugment, random erasing)."""
    image_folder(tmp_path)
    augment, cpu = Augment(randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5), torch.device("cpu")

    def epoch(data, number: int, workers: int) -> list[Tensor]:
        return [x for x, _ in data.train_batches(number, 16, 3, cpu, augment=augment, workers=workers)]

    def folder(**options):
        return load("imagefolder", tmp_path, img_size=16, **options)

    uninterrupted = folder()
    epoch(uninterrupted, 0, 2)
    second = epoch(uninterrupted, 1, 2)  # from the pair of persistent workers that decoded the first epoch
    for other in (epoch(folder(), 1, 2), epoch(folder(), 1, 1), epoch(folder(), 1, 0)):  # resumed at epoch 1; one worker; none
        assert len(other) == len(second) and all(torch.equal(a, b) for a, b in zip(other, second))
    ranks = [epoch(folder().shard(rank, 2), 1, 1) for rank in (0, 1)]  # a two-worker trial's ranks: halves of the same batches
    assert all(torch.equal(torch.cat(halves), whole) for *halves, whole in zip(*ranks, second))
    np.random.seed(5)
    epoch(folder(), 1, 0)  # decoded in this process: the epoch's own draws (MixUp's, dropout's) go on as seeded
    assert np.random.random() == np.random.RandomState(5).random_sample()
    images = uninterrupted._loader("train", 16, cpu, 0, augment).dataset
    assert torch.equal(images[(0, 7)][0], images[(0, 7)][0]) and not torch.equal(images[(0, 7)][0], images[(0, 8)][0])  # random, seeded


def test_a_corrupt_image_is_skipped_and_counted_and_training_goes_on(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "train" / "class_1" / os.fsdecode(b"broken\xfe.png")).write_bytes(b"not a png at all")  # a name not UTF-8
    (tmp_path / "val" / "class_2" / "broken.png").write_bytes(b"")  # a test image: evaluation skips it, and says so
    data = load("imagefolder", tmp_path, img_size=16)
    model = create_model("convmixer", dim=8, depth=2, patch_size=4, kernel_size=3, num_classes=3)
    with pytest.warns(UserWarning) as warned:
        results = list(train_epochs(model, data, Recipe(recipe="spin", epochs=2, batch_size=16), workers=2))
    assert len(results) == 2 and not results[-1].diverged
    assert [r.unreadable_images for r in results] == [2, 2]  # what a search's results and MLflow carry
    said = [str(w.message) for w in warned if "unreadable" in str(w.message)]
    assert len(said) == 2 and re.search(r"skipped 1 unreadable images so far \(e.g. .*train/class_1/broken\\xfe.png\); replace or "
                                        "remove", said[0].encode().decode())  # printable: its bytes escaped
    assert re.search(r"skipped 2 unreadable images so far \(e.g. .*val/class_2/broken.png\)", said[1])  # once, not every epoch


def test_a_split_of_no_readable_image_or_none_at_all_is_refused_by_name(tmp_path):
    image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(DataError, match=r"val_fraction: 0.1 of 6 training examples leaves a split empty"):
        load("imagefolder", tmp_path / "few", val_fraction=0.1)  # before any trial: an accuracy of none divides by 0
    data = load("imagefolder", image_folder(tmp_path / "all"), img_size=16)
    for image in (tmp_path / "all" / "val").rglob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(DataError, match=r"every image of the test split is unreadable \(e.g. .*\.png\); replace or remove them"):
        list(data.eval_batches("test", CPU))


def test_a_relative_root_is_the_folder_it_names_where_the_spec_was_read(tmp_path, monkeypatch):
    image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps(load("imagefolder", "images", img_size=16))  # as the object store hands it to a trial
    monkeypatch.chdir("/")  # which runs in Ray's own folder
    assert sum(len(y) for _, y in pickle.loads(data).eval_batches("test", CPU)) == 24


def test_cka_samples_are_training_images(tmp_path):
    data = load("imagefolder", image_folder(tmp_path), img_size=16)
    for image in (tmp_path / "val").rglob("*.png"):
        image.write_bytes(b"")  # the test split unreadable: the samples never come from it
    assert data.sample_inputs(6).shape == (6, 3, 16, 16)
    assert torch.equal(data.shard(1, 2).sample_inputs(6), data.sample_inputs(6))  # every rank: the same plan


def _rank_batches(data: ImageFolderData, world: int, epoch: int = 0) -> list[list[list[int]]]:
    """Each rank's training labels, batch by batch (batches of 8 at seed 5)."""
    return [[y.tolist() for _, y in data.shard(rank, world).train_batches(epoch, 8, seed=5, device=CPU)] for rank in range(world)]


def test_data_parallel_ranks_read_their_shares_of_the_one_process_batches(tmp_path):
    data = load("imagefolder", image_folder(tmp_path), img_size=16, val_fraction=0)
    alone = [y.tolist() for _, y in data.train_batches(0, 8, seed=5, device=CPU)]
    first, second = _rank_batches(data, 2)
    assert [a + b for a, b in zip(first, second, strict=True)] == alone  # the same steps, each batch split in two
    test = [len(y) for rank in range(3) for _, y in data.shard(rank, 3).eval_batches("test", CPU)]
    assert sum(test) == len(data._lists()["test"]) and len(test) == 3  # every test image once, over the ranks


def test_a_rank_whose_share_of_a_batch_is_unreadable_still_takes_the_step(tmp_path):
    """Else it would skip a step the other rank takes, and both would wait in the all-reduce."""
    data = load("imagefolder", image_folder(tmp_path), img_size=16)
    files = data._lists()["train"]
    order = epoch_order(len(files), 5, 0).tolist()
    for index in order[12:16]:  # rank 1's share of the second batch
        with open(files[index][0], "wb") as broken:
            broken.write(b"not a png at all")
    with pytest.warns(UserWarning, match=r"skipped 4 unreadable images"):
        first, second = _rank_batches(data, 2)
    assert len(first) == len(second) == len(files) // 8 and second[1] == second[0]  # its last share again
    for index in order[4:8]:  # and the first batch's: no share to repeat (an evaluation batch is none)
        with open(files[index][0], "wb") as broken:
            broken.write(b"not a png either")
    second = data.shard(1, 2)
    assert list(second.eval_batches("test", CPU))
    with pytest.raises(DataError, match=r"every image of rank 1's share of its first batch is unreadable \(e.g. .*\.png\)"):
        list(second.train_batches(0, 8, seed=5, device=CPU))


EMPTY_CLASS = (r"val/class_2: an empty class folder \(no file ending in \.jpg, \.jpeg, \.png, \.ppm, \.bmp, \.pgm, \.tif, "
               r"\.tiff, \.webp, in any case, in it or its sub-folders\); add its images or remove it$")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: __import__("shutil").rmtree(root / "val"), r"val: no such folder; an image folder needs root/train/<class>/.* \(root: data.root, or --data-dir for sharetune train\)$"),
        (lambda root: (root / "train" / "class_3").mkdir(), r"train/ and val/ hold different classes \(e.g. 'class_3'\)"),
        (lambda root: [p.unlink() for p in (root / "val" / "class_2").iterdir()], EMPTY_CLASS),
        (lambda root: [p.rename(p.with_suffix(".gif")) for p in (root / "val" / "class_2").iterdir()], EMPTY_CLASS),  # none ImageFolder reads
        (lambda root: [p.rename(p.parent / f".{p.name}") for p in (root / "val" / "class_2").iterdir()], EMPTY_CLASS),  # hidden: macOS's ._x.png
        (lambda root: [__import__("shutil").rmtree(root / split / name) for split in ("train", "val") for name in ("class_1", "class_2")],
         r"hold one class folder \('class_0'\); a classifier needs at least two classes: add a folder for each of the others$"),
    ],
    ids=["no val", "other classes", "empty class", "no image file", "hidden images only", "one class"],
)
def test_a_bad_folder_gets_one_line_naming_the_path_and_the_fix(tmp_path, damage, message):
    damage(image_folder(tmp_path))
    with pytest.raises(DataError, match=message):
        load("imagefolder", tmp_path)


def test_a_folder_of_one_class_is_refused_in_one_line_before_training(tmp_path):
    """It trained to loss 0 and accuracy 1: one class leaves nothing to tell apart."""
    root = image_folder(tmp_path, classes=1)
    result = CliRunner().invoke(app, ["train", "spin", "--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "1", "--json"])
    assert (result.exit_code, result.output) == (2, f"error: {root}: train/ and val/ hold one class folder ('class_0'); a classifier "
                                                    "needs at least two classes: add a folder for each of the others\n")


def test_a_folder_reads_the_images_torchvisions_imagefolder_reads(tmp_path):
    """ImageNet-layout folders are prepared for torchvision: each extension its `ImageFolder` takes, in any
    case, and the images in a class folder's sub-folders too."""
    from torchvision.datasets import ImageFolder

    root = image_folder(tmp_path)
    for split in ("train", "val"):
        for i, path in enumerate(sorted((root / split / "class_0").iterdir())):
            Image.open(path).save(path.with_suffix(".WEBP" if i % 2 else ".webp"))
            path.unlink()
        for i, path in enumerate(sorted((root / split / "class_1").iterdir())):
            Image.open(path).save(path.with_suffix(".bmp" if i % 2 else ".tif"))
            path.unlink()
        nested = root / split / "class_2" / "n01440764"
        nested.mkdir()
        for path in sorted((root / split / "class_2").glob("*.png"))[::2]:  # half of them one level down
            path.rename(nested / path.name)
    data = load("imagefolder", root, img_size=16, val_fraction=0)
    lists = data._lists()
    assert sorted(lists["train"]) == sorted(ImageFolder(str(root / "train")).samples)
    assert sorted(lists["test"]) == sorted(ImageFolder(str(root / "val")).samples)
    assert sum(len(y) for _, y in data.eval_batches("test", CPU)) == 24 and data.unreadable() == 0  # PIL decodes them all


def test_hidden_folders_and_files_are_no_classes_and_no_images(tmp_path):
    """A notebook's .ipynb_checkpoints was taken for a class (and refused as empty); macOS's ._x.png is no image."""
    root = image_folder(tmp_path)
    plain = load("imagefolder", root, img_size=16, val_fraction=0)._lists()
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".DS_Store").write_bytes(b"")
        (root / split / "class_0" / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (16, 16)).save(root / split / "class_0" / ".ipynb_checkpoints" / "0-checkpoint.png")
        (root / split / "class_1" / "._0.png").write_bytes(b"macOS's metadata, not a png")
    data = load("imagefolder", root, img_size=16, val_fraction=0)
    assert data.class_names() == ["class_0", "class_1", "class_2"] and data._lists() == plain


def test_a_trial_whose_node_lists_other_files_than_the_search_did_is_refused_in_one_line(tmp_path):
    """Each trial lists the folder again on its own node (a shared filesystem, or a copy per node): a copy that
    differs, or a folder changed while the search runs, would train and compare trials on other images."""
    root = image_folder(tmp_path / "images")
    data = load("imagefolder", root, img_size=16, val_fraction=0.25)
    assert re.fullmatch(r"train 54, val 18, test 24 images; sha256 [0-9a-f]{16}", data.listing)
    as_a_trial_gets_it = lambda: pickle.loads(pickle.dumps(data))  # noqa: E731
    assert as_a_trial_gets_it().steps_per_epoch(8) == 7 and as_a_trial_gets_it().shard(1, 2).steps_per_epoch(8) == 7
    started = data.listing
    moved = root / "train" / "class_0" / "0.png"
    moved.rename(root / "train" / "class_1" / "moved.png")  # the same count, another label: not the same data
    with pytest.raises(DataError) as refused:
        as_a_trial_gets_it().steps_per_epoch(8)
    here = load("imagefolder", root, img_size=16, val_fraction=0.25).listing
    assert here != started and re.fullmatch(r"train 54, val 18, test 24 images; sha256 [0-9a-f]{16}", here)
    assert str(refused.value) == (f"{root}: its files on {socket.gethostname()} ({here}) are not those the search listed where it started "
                                  f"({started}); give every node the same copy, unchanged while the search runs")
    (root / "train" / "class_1" / "moved.png").rename(moved)
    assert as_a_trial_gets_it().steps_per_epoch(8) == 7 and load("synthetic").listing is None
