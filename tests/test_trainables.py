"""Trial settings -> model, without Ray: the builders, the costs, and the pretraining SPIN starts from."""

import pickle
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import MODEL_KINDS, build_kind, image_folder, tiny_spec

from sharetune.data import DataError, load
from sharetune.models import deployed
from sharetune.spaces import SpecError, SpinSettings, parse_spec
from sharetune.trainables import (
    PRETRAINED_FILE,
    build_model,
    costs_of,
    export_trial,
    load_exported,
    load_preprocessing,
    pretrain,
    pretrained_weights,
)
from sharetune.trainables.build import build_spin, built_for
from sharetune.trainables.trial import BUILT_FOR, CHECKPOINT, ConfigurationError, check_same_input
from sharetune.training import TrainingState, evaluate, train_epochs

ARCH = {"dim": 8, "depth": 4, "patch_size": 2, "kernel_size": 3}


class MemoryStore(dict):
    """A FileStore in memory (a search passes its folder)."""

    def read(self, filename):
        return self.get(filename)

    def write(self, filename, data):
        self[filename] = data


def test_a_cka_mapped_trial_starts_from_the_searchs_pretrained_weights_and_groups_contiguous_layers():
    data = load("synthetic")
    spec = parse_spec(tiny_spec(family="spin", fixed={**ARCH, "share_rate": 2, "mapping": "cka", "pretrain_epochs": 1},
                                dimensions={}))
    store = MemoryStore()
    pretrained = pretrained_weights(spec, data, store)
    assert set(store) == {PRETRAINED_FILE} and pretrained_weights(spec, data, store).keys() == pretrained.keys()
    model = build_model(SpinSettings(**ARCH, share_rate=2, mapping="cka", pretrain_epochs=1), data, pretrained)
    plan = model.sharing_plan
    assert plan.num_entries == 2 and list(plan.bank_ids) == sorted(plan.bank_ids)
    assert costs_of(model, data).unique_params < costs_of(build_model(SpinSettings(**ARCH), data), data).unique_params


def test_pretraining_hands_back_the_weights_whose_accuracy_it_reported():
    data = load("synthetic")
    settings = SpinSettings(**ARCH, share_rate=2, fusion="mean", pretrain_epochs=3, batch_size=32, ema_decay=0.9, mixup=0, cutmix=0,
                            lr=0.01, lr_batch=0)
    said = []
    weights = pretrain(settings, data, say=said.append)
    model = build_spin(settings, data, unshared=True)
    model.load_state_dict(weights)
    reported = float(said[-1].rpartition("test accuracy ")[2])
    assert evaluate(model, data.eval_batches("test", torch.device("cpu"))) == pytest.approx(reported, abs=1e-4)  # the EMA's
    with pytest.raises(ValueError, match=r"pretrain_epochs: 2 would end the pretraining inside the warm-up \(warmup_epochs: 2\)"):
        SpinSettings(**ARCH, share_rate=2, fusion="mean", pretrain_epochs=2, schedule="cosine", warmup_epochs=2)


def test_searches_that_never_fuse_or_map_by_cka_pretrain_nothing():
    spec = parse_spec(tiny_spec(family="spin", fixed={**ARCH, "share_rate": 2}, dimensions={}))
    store = MemoryStore()
    assert pretrained_weights(spec, load("synthetic"), store) is None and not store


def test_a_search_that_searches_its_sharing_pretrains_the_fixed_unshared_model_once():
    data = load("synthetic")
    spec = parse_spec(tiny_spec(family="spin", fixed={**ARCH, "fusion": "mean", "pretrain_epochs": 1},
                                dimensions={"share_rate": {"choice": [2, 4]}, "lr": {"loguniform": [1e-3, 1e-2]}}))
    assert spec.pretraining_settings() == SpinSettings(**ARCH, pretrain_epochs=1)  # fusion alone would need share_rate > 1
    pretrained = pretrained_weights(spec, data, MemoryStore())
    for share_rate in (2, 4):  # both start from it
        build_model(SpinSettings(**ARCH, share_rate=share_rate, fusion="mean", pretrain_epochs=1), data, pretrained)


@pytest.mark.parametrize("changes, message", [
    ({"dimensions": {"dim": {"choice": [8, 16]}}}, r"dimensions.dim: the trials that fuse or map by cka start from one "
     r"unshared model, pretrained with the fixed settings \(dim: the model's default\), so dim is fixed for them"),
    ({"dimensions": {"variant": {"choice": ["wide"]}}, "variants": {"wide": {"depth": 8}}},
     r"variants.wide.depth: .* \(depth: 4\)"),
    ({"dimensions": {"pretrain_epochs": {"choice": [1, 2]}}},
     r"dimensions.pretrain_epochs: the search pretrains one unshared model for all its trials; give pretrain_epochs in fixed"),
    ({"dimensions": {"variant": {"choice": ["long"]}}, "variants": {"long": {"pretrain_epochs": 3}}},
     r"variants.long.pretrain_epochs: the search pretrains one unshared model"),
])
def test_what_the_one_pretrained_model_is_cannot_vary_across_the_trials_that_start_from_it(changes, message):
    fixed = {**ARCH, "share_rate": 2, "fusion": "mean", "pretrain_epochs": 1}
    for name in ("dim", "pretrain_epochs"):
        if name in changes.get("dimensions", {}):
            fixed.pop(name)
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec(family="spin", fixed=fixed, **changes))
    # the same sizes searched only where nothing fuses are fine
    parse_spec(tiny_spec(family="spin", fixed={"dim": 8, "share_rate": 2, "pretrain_epochs": 1},
                         dimensions={"fusion": {"choice": [None, "mean"]},
                                     "depth": {"choice": [4, 8], "when": {"fusion": [None]}}}))


def test_the_cka_mapping_needs_pretrained_weights_and_the_uniform_distribution():
    with pytest.raises(SpecError, match="mapping: 'cka': needs pretrained weights; set pretrained"):
        parse_spec(tiny_spec(family="spin", fixed={"share_rate": 2, "mapping": "cka"}, dimensions={}))
    with pytest.raises(SpecError, match="distribution: the cka mapping groups the whole depth"):
        parse_spec(tiny_spec(family="spin", fixed={"share_rate": 2, "mapping": "cka", "distribution": "middle",
                                                   "pretrain_epochs": 1}, dimensions={}))


def test_a_resized_spin_trial_counts_the_network_at_its_resolution():
    data = load("synthetic")  # 8 x 8 inputs, resized to 16 x 16
    small, large = (costs_of(build_model(SpinSettings(**ARCH, img_size=size), data), data) for size in (8, 16))
    assert small.unique_params == large.unique_params and large.macs > 3 * small.macs


def test_a_configuration_that_cannot_be_built_is_told_apart_from_other_failures(tmp_path):
    """What decides a trial's retries (sharetune.search.retries): a model that cannot be built, from
    the trial itself, through a raise that wraps it, or from any rank of a Ray Train run; a node's data that
    differs from the search's is not the configuration's fault."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from sharetune.errors import cause_of
    from sharetune.trainables.trial import ConfigurationError, built, run_trial

    data = load("synthetic")
    config = {"family": "spin", "model": "deit_tiny", "dim": 8, "depth": 1, "patch_size": 4}
    with pytest.raises(ConfigurationError, match="^the configuration cannot be built: ValueError: dim: 8 is not a multiple of deit_tiny's 3 attention heads") as unbuildable:
        built(config, data, None)
    *_, costs = built({**config, "dim": 9}, data, None)
    assert costs.unique_params > 0
    with pytest.raises(ConfigurationError, match="^precision: fp16 needs a CUDA device"):  # a device that lacks it
        run_trial({**config, "dim": 9, "precision": "fp16"}, data, None, session=None, cpus=torch.get_num_threads(),
                  device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="can't allocate memory"):  # memory running out: a retry may find more
        built({**config, "model": "convmixer", "dim": 10**7}, data, None)  # 400 TB of pointwise weights
    try:
        raise RuntimeError("the run failed") from unbuildable.value
    except RuntimeError as wrapped:
        assert cause_of(wrapped, ConfigurationError) is unbuildable.value
    ranks = WorkerGroupError("a rank failed", {0: RuntimeError("gloo timed out"), 1: unbuildable.value})
    assert cause_of(ranks, ConfigurationError) is unbuildable.value
    assert cause_of(WorkerGroupError("a rank died", {0: RuntimeError("gloo timed out")}), ConfigurationError) is None
    folder = image_folder(tmp_path / "images")
    images = pickle.loads(pickle.dumps(load("imagefolder", folder, img_size=16)))  # as a trial gets it
    (folder / "train" / "class_0" / "0.png").unlink()  # this node's copy differs from the search's
    with pytest.raises(DataError, match="are not those the search listed where it started"):
        built({**config, "dim": 9, "img_size": 24}, images, None)
    # a Ray task's copy of an error reads as it (pretraining's), with the remote traceback in its message
    remote = RayTaskError("pretrain", "Traceback (most recent call last):\n...", DataError("x", "root")).as_instanceof_cause()
    assert isinstance(remote, DataError) and "\n" in str(remote) and str(cause_of(remote, DataError)) == "root: x"


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_model_kind_exports_the_model_its_metrics_measured(kind, tmp_path):
    """The exported file, rebuilt without the trial, computes what evaluation ran: the model EMA's
    weights (a recipe with `ema_decay`), deployed (fused layers folded)."""
    data = load("synthetic", train_subset=64, test_subset=32)
    changes = {"epochs": 1, "batch_size": 16, "ema_decay": 0.5}
    settings, model = build_kind(kind, data, **changes)
    state = TrainingState.for_data(model, settings, data)
    list(train_epochs(model, data, settings, device="cpu", state=state))
    checkpoint = {"model": model.state_dict(), "training": state.state_dict(), BUILT_FOR: built_for(model, data)}
    torch.save(checkpoint, tmp_path / CHECKPOINT)  # as a trial saves it
    export_trial({**MODEL_KINDS[kind], **changes}, tmp_path, tmp_path / "model.pt")  # without the data
    x = data.sample_inputs(8)
    evaluated = deployed(state.evaluated(model)).eval()
    assert not torch.allclose(evaluated(x), deployed(model).eval()(x))  # the EMA is not the live model
    torch.testing.assert_close(load_exported(tmp_path / "model.pt")(x), evaluated(x), rtol=1e-5, atol=1e-5)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["classes"] == ["0", "1", "2", "3"]  # what outputs mean


def test_a_checkpoint_that_does_not_record_its_model_input_is_refused_by_export(tmp_path):
    """An earlier sharetune's checkpoints did not record the input shape and sharing plan."""
    torch.save({"model": {}, "training": {"ema": None}}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="^its checkpoint was written by an older sharetune"):
        export_trial(MODEL_KINDS["arbnet dirichlet"], tmp_path, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    hostile = pickle.dumps({"model": Payload(tmp_path / "ran")}, protocol=4)  # not torch's own protocol: torch warned
    for damaged in (b"", b"PK\x03\x04 cut short", hostile):  # a disk that filled, a copy cut short, a pickle that runs code
        (tmp_path / CHECKPOINT).write_bytes(damaged)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=f"^its checkpoint {tmp_path / CHECKPOINT} cannot be read: it is cut short, "
                                                 "not a torch file, or holds objects torch would load as code$"):
                export_trial(MODEL_KINDS["arbnet dirichlet"], tmp_path, tmp_path / "model.pt")
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_from_before_preprocessing_was_recorded_exports_resumes_and_says_what_it_lacks(tmp_path):
    data = load("synthetic", train_subset=64, test_subset=32)
    _, model = build_kind("arbnet dirichlet", data)
    now = built_for(model, data)
    older = {key: value for key, value in now.items() if key != "preprocessing"}
    check_same_input(older, now)  # resume: what it did not record is not compared
    with pytest.raises(ConfigurationError, match=r"^the data changed since this trial's checkpoint \(preprocessing: "):
        check_same_input({**now, "preprocessing": {**now["preprocessing"], "std": [1.0]}}, now)
    torch.save({"model": model.state_dict(), "training": {"ema": None}, BUILT_FOR: older}, tmp_path / CHECKPOINT)
    export_trial(MODEL_KINDS["arbnet dirichlet"], tmp_path, tmp_path / "model.pt")
    x = data.sample_inputs(4)
    torch.testing.assert_close(load_exported(tmp_path / "model.pt")(x), deployed(model).eval()(x))
    with pytest.raises(ValueError, match=r"model.pt: its trial did not record its preprocessing \(a checkpoint an older sharetune wrote"):
        load_preprocessing(tmp_path / "model.pt")


def test_a_trial_resumed_on_changed_data_fails_once_naming_what_changed(tmp_path):
    """A class folder added before `resume`: the checkpoint's model no longer fits the data. The trial
    fails as unbuildable (no retry) with the reason, where loading the state failed three times, in
    torch's words."""
    from ray import train

    from sharetune.trainables.trial import ConfigurationError, run_trial

    root = image_folder(tmp_path / "images", per_class=4, test_per_class=2)
    config = {"family": "spin", "dim": 8, "depth": 2, "patch_size": 4, "kernel_size": 3}
    before = load("imagefolder", root, img_size=16, val_fraction=0)
    settings, model = build_kind("convmixer shared", before)
    (tmp_path / "checkpoint").mkdir()
    torch.save({"model": model.state_dict(), BUILT_FOR: built_for(model, before)}, tmp_path / "checkpoint" / CHECKPOINT)
    for split in ("train", "val"):  # class_3 joins
        shutil.copytree(root / split / "class_0", root / split / "class_3")
    session = SimpleNamespace(get_checkpoint=lambda: train.Checkpoint.from_directory(tmp_path / "checkpoint"))
    changed = r"^the data changed since this trial's checkpoint \(classes: \['class_0', 'class_1', 'class_2'\], now "
    with pytest.raises(ConfigurationError, match=changed + r"\['class_0', 'class_1', 'class_2', 'class_3'\]\); give"):
        run_trial(config, load("imagefolder", root, img_size=16, val_fraction=0), None, session=session, cpus=1, device=torch.device("cpu"))


class Payload:
    """Code a pickle runs when it is loaded: it would leave `ran` behind."""

    def __init__(self, ran):
        self.ran = ran

    def __reduce__(self):
        return (Path.touch, (self.ran,))


def test_load_exported_refuses_any_other_file_in_one_line_and_runs_no_code(tmp_path):
    torch.save({"format": "sharetune-model-1", "config": Payload(tmp_path / "ran")}, tmp_path / "objects.pt")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "tensors.pt")
    for name in ("objects.pt", "image.png", "empty.pt", "tensors.pt"):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: not a model written by `sharetune export`"):
            load_exported(tmp_path / name)
    assert not (tmp_path / "ran").exists()
