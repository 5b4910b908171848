"""Validation that holds: every mistake in a spec, a spec file or a command line is one line naming
the field before Ray starts; weights and kernels never run code they should not."""

import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from forked_cli import ForkedCommands
from helpers import tiny_spec

from sharetune.cache import CACHE_ENV
from sharetune.data import load
from sharetune.errors import without_passwords
from sharetune.metrics import dense_reference
from sharetune.models import WeightsError, load_state_dict, native
from sharetune.search.destinations import check_destinations
from sharetune.search.storage import SearchFolder
from sharetune.spaces import SpecError, SpinSettings, load_spec, make_sampler, parse_spec, trial_settings
from sharetune.trainables import build_model, check_search, costs_of, preflight, pretrained_weights

SPIN = {"name": "s", "family": "spin", "data": {"name": "synthetic"}, "objectives": {"test_accuracy": "max"},
        "fixed": {"dim": 16, "depth": 4, "patch_size": 2, "kernel_size": 3, "batch_size": 16}}


def spin(**fixed) -> dict:
    """The SPIN spec with `fixed` changed (None: left out)."""
    return {**SPIN, "fixed": {k: v for k, v in {**SPIN["fixed"], **fixed}.items() if v is not None}}


@pytest.mark.parametrize("raw, message", [
    ({**tiny_spec(), 1: 2}, r"spec: key 1 is not a string; quote it"),
    (tiny_spec(data={"name": "synthetic", "seed": -1}), r"data.seed: got -1; input should be greater than or equal to 0"),
    (tiny_spec(optuna_storage="zzz"), r"optuna_storage: 'zzz' is not a database URL SQLAlchemy knows"),
    (tiny_spec(optuna_storage="sqlite:////no/such/folder/optuna.db"), r"optuna_storage: .*folder /no/such/folder does not exist"),
    (tiny_spec(dimensions={"sparsity": {"uniform": [0, float("inf")]}}), r"dimensions.sparsity.uniform.1: Input should be a finite"),
    (tiny_spec(dimensions={"alpha": {"loguniform": [0.1, 1], "step": 0.1}}), r"dimensions.alpha: step: applies to uniform and int"),
    (tiny_spec(dimensions={"radius": {"int": [0, 10], "step": 0.5}, "hash": {"choice": ["neighborhood"]}}),
     r"dimensions.radius: step: int needs a whole step, got 0.5"),
    (tiny_spec(dimensions={"sparsity": {"uniform": [0, 0.9], "step": 5}}),  # Optuna sampled 0 alone, with its own warning
     r"^dimensions.sparsity: step: 5 is wider than uniform \[0, 0.9\], which leaves one value; allowed: up to 0.9$"),
    (tiny_spec(name="it's"), r"""name: "it's" is not a safe folder name; allowed: letters, digits"""),
    (tiny_spec(name="../x"), r"name: '../x' is not a safe folder name"),
    (tiny_spec(name="a/b"), r"name: 'a/b' is not a safe folder name"),
    (tiny_spec(fixed={"table_size": 64, "hidden": [0]}), r"fixed.hidden.0: got 0; input should be greater than 0"),
    (tiny_spec(seed=2**63), r"seed: got 9223372036854775808; input should be less than or equal to 4294967295"),
    (tiny_spec(fixed={"table_size": 64, "seed": 2**63}), r"fixed.seed: got 9223372036854775808"),
    (spin(share_rate=float("inf")), r"fixed.share_rate: Input should be a finite number"),
    (tiny_spec(dimensions={"hash": {"choice": ["uniform", "dirichlet"]},
                           "sparsity": {"uniform": [0, 0.5], "when": {"hash": ["identity"]}}}),
     r"dimensions.sparsity.when: hash can never be any of \['identity'\], so sparsity would never be sampled"),
    (tiny_spec(dimensions={"hash": {"choice": ["uniform"]}, "alpha": {"loguniform": [0.1, 1.0]}}),
     r"dimensions.alpha.when: hash can never be any of \['dirichlet'\], so alpha would never be sampled; allowed: "
     r"values hash can take, or leave alpha out \(dimensions.alpha: null\)$"),
    (tiny_spec(dimensions={"hash": {"choice": ["md5"]}, "alpha": {"loguniform": [0.1, 1.0]}}), r"^dimensions.hash: unknown hash 'md5'"),
    (tiny_spec(fixed={"table_size": 64, "epochs": 1}, dimensions={"sparsity": {"uniform": [0, 0.5], "when": {"epochs": [2]}}}),
     r"dimensions.sparsity.when: epochs can never be any of \[2\]"),
    (tiny_spec(variants={"big": {"table_size": -5}}), r"^variants.big.table_size: got -5; input should be greater than or equal to 1 "
     r"\(no trial picks variant big; variants: \{\} leaves a preset's out\)$"),
    (tiny_spec(resources={"cpu": float("inf")}), r"resources.cpu: Input should be a finite number"),
    ({k: v for k, v in tiny_spec().items() if k != "family"}, r"^family: required; allowed: arbnet, spin$"),
    (spin(transform_groups=4), r"^fixed.transform_groups: no trial of this search reads it \(it applies where share_rate is above 1\); "
                               r"leave transform_groups out \(--set fixed.transform_groups=null\)$"),
    ({**spin(share_rate=2, pretrain_epochs=2), "dimensions": {"mapping": {"choice": ["sequential", "strided"]}}},
     r"^fixed.pretrain_epochs: no trial of this search reads it \(it applies where fusion or the cka mapping start from"),
    (spin(model="deit_tiny", dim=6, patch_size=4, kernel_size=5), r"^fixed.kernel_size: no trial of this search reads it \(it applies "
                                                                  r"to the models that take it: convmixer, convnext_isotropic\); "),
])
def test_invalid_specs_fail_in_one_line_naming_the_field(raw, message):
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(raw)
    assert "\n" not in str(caught.value)


def test_a_sharing_option_some_trials_read_is_accepted():
    """Searching share_rate down to 1 with transforms fixed: the trials above 1 read them."""
    spec = parse_spec({**spin(transform_groups=4), "dimensions": {"share_rate": {"choice": [1, 2]}}})
    assert {settings.transform_groups for settings in spec.extreme_settings()} == {4}
    spec = parse_spec({**spin(dim=6, patch_size=4, kernel_size=5), "dimensions": {"model": {"choice": ["convmixer", "deit_tiny"]}}})
    assert {settings.kernel_size for settings in spec.extreme_settings()} == {5}  # the convmixer trials read it
    # a variant no trial picks gives nothing: the unshared one alone runs, the mapped one is only checked
    spec = parse_spec({**spin(variant="plain"), "variants": {"plain": {}, "mapped": {"share_rate": 2, "mapping": "strided"}}})
    assert [settings.mapping for settings in spec.extreme_settings()] == ["sequential"]


def test_a_setting_no_trial_reads_is_left_out_with_the_line_the_error_gives(tmp_path):
    """The preset fixes pretrain_epochs for its fusion trials; without them, null leaves it out."""
    with pytest.raises(SpecError, match=r"^fixed.pretrain_epochs: no trial of this search reads it .*\(--set fixed.pretrain_epochs=null\)$"):
        load_spec("spin-fusion", ["dimensions.fusion=null"])
    spec = load_spec("spin-fusion", ["dimensions.fusion=null", "fixed.pretrain_epochs=null"])
    assert "pretrain_epochs" not in spec.fixed and {s.pretrain_epochs for s in spec.extreme_settings()} == {0}


def test_a_dimension_set_to_null_is_left_out(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(dimensions={"hash": {"choice": ["uniform", "neighborhood"]}, "radius": {"int": [0, 4]}})))
    spec = load_spec(path, ["dimensions.hash={choice: [uniform, dirichlet]}", "dimensions.radius=null"])
    assert list(spec.dimensions) == ["hash"]
    for order in (["fixed.hash=neighborhood", "dimensions.hash=null"], ["dimensions.hash=null", "fixed.hash=neighborhood"]):
        spec = load_spec(path, order)  # dropping the dimension keeps what is fixed, whichever comes first
        assert spec.fixed["hash"] == "neighborhood" and "hash" not in spec.dimensions, order


def test_a_when_that_can_hold_is_kept():
    spec = parse_spec(tiny_spec(fixed={"table_size": 64, "epochs": 2},
                                dimensions={"sparsity": {"uniform": [0, 0.5], "when": {"epochs": [2, 3]}},
                                            "radius": {"int": [0, 4], "when": {"hash": ["neighborhood"]}},
                                            "hash": {"choice": ["uniform", "neighborhood"]}}))
    assert spec.condition("radius") == {"hash": ["neighborhood"]}


@pytest.mark.parametrize("sampler, option", [("tpe", "gamma"), ("motpe", "weights"), ("nsga2", "after_trial_strategy")])
def test_an_option_optuna_takes_as_a_function_is_one_line_without_optunas_notices_before_it(sampler, option, recwarn):
    """A spec's values are data: `gamma: 0.3` printed Optuna's FutureWarning (gamma is deprecated), then failed at trial 11."""
    with pytest.raises(SpecError, match=rf"^sampler_options.{option}: the {sampler} sampler takes a function there, which a "
                                        "spec cannot give; leave it out for the sampler's own$"):
        make_sampler(parse_spec(tiny_spec(sampler=sampler, sampler_options={option: 0.3})))
    assert [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)] == []


@pytest.fixture(scope="module")
def synthetic():
    return load("synthetic")


@pytest.mark.parametrize("raw, message", [
    (tiny_spec(sampler_options={"n_ei_candidates": 0}), r"sampler_options: tpe sampler with \{'n_ei_candidates': 0\} fails at trial 11 "
                                                        "of a dry run"),
    (tiny_spec(sampler="nsga2", sampler_options={"population_size": 4, "mutation_prob": "x"}),
     r"sampler_options: nsga2 sampler rejected"),
    (tiny_spec(fixed={"table_size": 10**12, "hidden": [16]}), r"model \(hash='uniform', table_size=1000000000000, hidden=\[16\]\): "
                                                             r"needs about .* GiB to hash its index, more than this machine's memory"),
    (spin(patch_size=64), r"^patch_size: 64 is larger than the 8 x 8 images the model sees; allowed: up to 8, or an img_size of at least the patch$"),
    (spin(patch_size=None, img_size=12), r"^patch_size: 14 \(convmixer default\) is larger than the 12 x 12 images the model sees; allowed: up to 12$"),
    (spin(share_rate=100), r"model \(.*share_rate=100.0\): fails on 16x1x8x8 inputs: share_rate: must be between 1 and the depth \(4\)"),
    (spin(dim=100_000, depth=64), r"model \(.*dim=100000, depth=64.*\): needs about .* GiB to train on batches of "
                                  r"16x1x8x8 \(batch_size, then the image: img_size or data.img_size\)"),
    (spin(share_rate=2, fusion="mean", pretrain_epochs=1, components="batchnorm"), r"model \(.*fusion='mean'.*\): .*'batchnorm' holds a BatchNorm2d"),
    (spin(share_rate=2, model="deit_tiny", dim=12, patch_size=4, kernel_size=None, transform_groups=2), r"transform_groups: transforms act on shared weights"),
])
def test_dry_runs_catch_what_fails_only_in_a_trial(raw, message, synthetic):
    spec = parse_spec(raw)  # valid by types and ranges
    with pytest.raises(SpecError, match=message):
        check_search(spec, synthetic)


def test_the_dry_runs_build_each_extreme_model_once_and_say_how_far_they_are(synthetic, monkeypatch):
    """An ArbNet on 224-pixel images took minutes to hash at every extreme, twice where a radius beside
    the dirichlet hash changed nothing, and said nothing meanwhile."""
    spec = parse_spec(tiny_spec(dimensions={"hash": {"choice": ["dirichlet", "neighborhood"]}, "alpha": {"loguniform": [0.1, 10]},
                                            "radius": {"int": [0, 4]}}))
    monkeypatch.setattr(preflight, "PROGRESS_S", 0)  # a line after every model but the last
    said = []
    assert len(spec.extreme_settings()) == 8 and len(check_search(spec, synthetic, say=said.append)) == 4
    assert said == [f"checking the models at the dimensions' extremes before any trial starts: {n} of 4 built" for n in (1, 2, 3)]


def test_a_sound_spec_passes_its_dry_runs_with_the_costs_of_the_models_its_extremes_build(synthetic):
    for raw in (tiny_spec(), tiny_spec(sampler="gp"), {**SPIN, "fixed": {"depth": 4, "patch_size": 2, "kernel_size": 3, "share_rate": 2}, "dimensions": {"dim": {"choice": [8, 16]}}}):
        spec = parse_spec(raw)
        models = {settings.model_dump_json(): settings for settings in spec.extreme_settings()}.values()  # each model once
        built = [costs_of(build_model(settings, synthetic), synthetic) for settings in models]
        dry = check_search(spec, synthetic)  # on the meta device: shapes, no values (an ArbNet's entropy needs its index)
        assert dry == [replace(costs, entropy=None) for costs in built]
    # the fronts' reference: the widest net's unshared size and its MACs, whichever trials a search happens to train
    widest = costs_of(build_model(SpinSettings(**SPIN["fixed"]), synthetic), synthetic)  # dim 16, unshared
    assert dense_reference(dry) == {"unique_params": widest.virtual_params, "macs": widest.macs} and widest.macs > built[0].macs


def test_a_pretrained_file_must_be_a_state_dict_that_fits(tmp_path, synthetic):
    fused = spin(share_rate=2, fusion="mean")
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    unshared = parse_spec(spin()).extreme_settings()[0]
    good = build_model(unshared, synthetic).state_dict()
    torch.save({**good, "head.weight": torch.zeros(3, 16)}, tmp_path / "wrong_shape.pt")
    torch.save(good, tmp_path / "good.pt")
    for name, message in [("other.pt", "not a state dict torch loads without running code"),
                          ("list.pt", r"not a state dict \(a mapping of parameter names to tensors\)"),
                          ("linear.pt", r"does not fit the unshared convmixer \(.* missing, 2 unexpected"),
                          ("wrong_shape.pt", r"head.weight is \(3, 16\), the model's is \(4, 16\)")]:
        with pytest.raises(SpecError, match=f"pretrained: .*{message}"):
            check_search(parse_spec({**fused, "fixed": {**fused["fixed"], "pretrained": str(tmp_path / name)}}), synthetic)
    check_search(parse_spec({**fused, "fixed": {**fused["fixed"], "pretrained": str(tmp_path / "good.pt")}}), synthetic)


def test_a_ctrl_c_no_command_caught_is_one_line_and_exit_130_and_a_commands_own_line_stays_alone(capsys, monkeypatch):
    """Typer answers a KeyboardInterrupt from a command (importing torch, loading a spec) with 130 and no
    word; a command that says why it stops keeps its own line."""
    import typer

    from sharetune.errors import ExitCode
    from sharetune.job_commands import fail, run

    def pressed_while_loading() -> None:
        raise KeyboardInterrupt

    def says_why() -> None:
        fail("interrupted while the search ended", ExitCode.INTERRUPTED)

    monkeypatch.setattr(sys, "argv", ["sharetune"])
    for command, said in [(pressed_while_loading, "error: interrupted\n"), (says_why, "error: interrupted while the search ended\n")]:
        app = typer.Typer()
        app.command()(command)
        with pytest.raises(SystemExit) as ended:
            run(app)
        assert ended.value.code == ExitCode.INTERRUPTED and capsys.readouterr().err == said

    def building(app: typer.Typer) -> None:  # pressed while typer builds the command, before its own handler
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.main, "get_command", building)  # it was a traceback
    with pytest.raises(SystemExit) as ended:
        run(app)
    assert ended.value.code == ExitCode.INTERRUPTED and capsys.readouterr().err == "error: interrupted\n"


def test_lines_show_no_password_of_a_url():
    for text, shown in [
        ("postgresql+psycopg://me:s3cret@db:5432/mlflow?sslmode=require", "postgresql+psycopg://me:***@db:5432/mlflow?sslmode=require"),
        ("postgresql://user@server:s3cret@server.example/db", "postgresql://user@server:***@server.example/db"),  # Azure's users
        ("http://me:p@ss@host:5000", "http://me:***@host:5000"),  # as urllib reads it: the password up to the last @
        ("API request to http://me:s3cret@host:5000/api/2.0/mlflow/runs/get failed", "API request to http://me:***@host:5000/api/2.0/mlflow/runs/get failed"),
        ("sqlite:////data/a:b@c.db", "sqlite:////data/a:b@c.db"), ("http://host:5000/x@y", "http://host:5000/x@y"),
    ]:
        assert without_passwords(text) == shown


def test_destinations_are_checked(tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    check_destinations(str(tmp_path / "new" / "results"), "ok-name_1.2", uri)
    for storage, name, mlflow, message in [
        (str(afile), None, uri, r"--storage: .*results.txt is a file; give a folder"),
        (str(afile / "below"), None, uri, r"--storage: .*results.txt is a file"),
        (str(tmp_path), "../x", uri, r"--name: '../x' is not a safe folder name"),
        (str(tmp_path), None, "zzz://host", r"--mlflow-uri: no MLflow tracking store for 'zzz://host'; allowed schemes: .*http"),
        (str(tmp_path), None, "postgresql+nodriver://me:s3cret@db/mlflow",  # the line reaches logs: no password
         r"^--mlflow-uri: 'postgresql\+nodriver://me:\*\*\*@db/mlflow' is not a database URL SQLAlchemy knows"),
        (str(tmp_path), None, "sqlite:////no/such/folder/m.db", r"--mlflow-uri: .*folder /no/such/folder does not exist"),
        (str(tmp_path), None, "sqlite:///", r"--mlflow-uri: 'sqlite:///' is an in-memory database, which keeps nothing; give a file"),
        (str(tmp_path), None, "sqlite://", r"--mlflow-uri: 'sqlite://' is an in-memory database"),
        (str(tmp_path), None, f"file://{tmp_path}/mlruns", r"--mlflow-uri: 'file://.*' is a folder store, which MLflow .* refuses"),
        (str(tmp_path), None, "mlruns", r"--mlflow-uri: 'mlruns' is a folder store"),
        ("foo://bucket/x", None, uri, r"--storage: no filesystem for foo:// URIs; allowed schemes: file, s3, gs"),
        ("s3://bucket/x?endpoint_override=minio:9000", None, uri,
         r"--storage: s3://bucket/x\?endpoint_override=minio:9000: options in a URI \(after '\?'\) are not supported; set them "
         r"in the environment instead, e.g. AWS_ENDPOINT_URL=http://host:9000"),
        (str(tmp_path / "o'brien \"x\""), None, uri, r"--storage: .* holds both ' and \"; MLflow's run filters cannot quote it"),
    ]:
        with pytest.raises(SpecError, match=message):
            check_destinations(storage, name, mlflow)


# Spec files: strict YAML

def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_duplicate_keys_are_an_error_not_a_dropped_block(tmp_path):
    text = yaml.safe_dump(tiny_spec()) + "fixed: {table_size: 8}\n"
    with pytest.raises(SpecError, match=r"spec: .*spec.yaml: not valid YAML: duplicate key 'fixed' \(line \d+"):
        load_spec(write(tmp_path, text))


def test_exponents_are_numbers_as_yaml_1_2_reads_them(tmp_path):
    from sharetune.spaces.documents import load_yaml

    assert load_yaml("[1e12, 1.5e3, -2E-3, 1.0e+12, 1_000e2, 1e, e12, 0x1e2, 1e12x]", "test") == [
        1e12, 1500.0, -0.002, 1e12, 1e5, "1e", "e12", 0x1E2, "1e12x"]
    path = write(tmp_path, yaml.safe_dump(tiny_spec()))
    spec = load_spec(path, ["fixed.epochs=1e1", "data.train_subset=2e3"])
    assert (spec.fixed["epochs"], spec.data.train_subset) == (10, 2000)
    assert trial_settings({"family": "arbnet", "table_size": load_yaml("1e3", "test")}).table_size == 1000


def test_non_utf8_deep_and_alias_bombs_are_errors(tmp_path):
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 6 is b'\\xff'\)"):
        load_spec(write(tmp_path, b"name: \xff\xfe"))
    with pytest.raises(SpecError, match="nested deeper than 32 levels"):
        load_spec(write(tmp_path, "fixed: {hidden: " + "[" * 5000 + "]" * 5000 + "}"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))
    with pytest.raises(SpecError, match="more than 100000 values once aliases are expanded"):
        load_spec(write(tmp_path, bomb))
    with pytest.raises(SpecError, match="nested deeper than 32 levels once aliases are expanded"):
        load_spec(write(tmp_path, "a: &a [*a]"))
    with pytest.raises(SpecError, match=r"spec: expected a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_a_spec_path_that_is_no_spec_file_says_what_it_is(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "big.yaml").write_text("name: x\ndescription: " + "a" * 1_000_000)
    for source, message in [(tmp_path / "folder.yaml", r"is a folder; give a spec file \(.yaml\) or a preset name"),
                            (tmp_path, "is a folder"), ("/dev/null", "spec: /dev/null is empty"),
                            (write(tmp_path, "\n"), "spec.yaml is empty"), (tmp_path / "nope.yaml", "spec: no such file"),
                            ("/dev/zero", "^spec: /dev/zero: larger than 1 MB; a spec is a few kB$"),  # read no further
                            (tmp_path / "big.yaml", "big.yaml: larger than 1 MB")]:
        with pytest.raises(SpecError, match=message):
            load_spec(source)
    spec = write(tmp_path, yaml.safe_dump(tiny_spec()))
    with pytest.raises(SpecError, match=rf"^scale: full applies to presets; {spec} is a spec, read as written: leave"):
        load_spec(spec, scale="full")  # it was ignored
    with pytest.raises(SpecError, match=r"^spec: env: needs a variable's name, e.g. env:SPEC$"):
        load_spec("env:")
    saved = tmp_path / "saved"  # the spec a search saved for itself is read whatever its size: an earlier version's
    saved.mkdir()
    (saved / "sharetune-spec.yaml").write_text(yaml.safe_dump({**tiny_spec(), "description": "é" * 600_000}, allow_unicode=True))
    assert len(SearchFolder(saved).spec().description) == 600_000
    with pytest.raises(SpecError, match=r"^--set description: larger than 1 MB"):
        load_spec(write(tmp_path, yaml.safe_dump(tiny_spec())), [f"description={'a' * 1_000_001}"])
    lines = "".join(f"line{i}:x:\n" for i in range(30))  # a file that is no spec (/etc/shadow): not echoed whole
    with pytest.raises(SpecError, match=r"^family: required; allowed: arbnet, spin; line0:x: unknown key; .*; and 26 more$"):
        load_spec(write(tmp_path, lines))


def test_set_values_are_yaml_or_one_line(tmp_path):
    path = write(tmp_path, yaml.safe_dump(tiny_spec()))
    for value, message in [("fixed.hidden=[1,", r"--set fixed.hidden: not valid YAML: .*\(line 1, column 4\)"),
                           ("fixed={a: 1, a: 2}", r"--set fixed: not valid YAML: duplicate key 'a'"),
                           ("name.x=1", r"--set name.x: name is not a mapping"),
                           ("fixed={1: 2}", r"fixed: key 1 is not a string")]:
        with pytest.raises(SpecError, match=message):
            load_spec(path, [value])


# The command line: exit 2, one line, no traceback

def sharetune(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sharetune.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})


@pytest.fixture(scope="module")
def forked():
    """Commands as real processes, each forked from one that loaded the CLI once (seconds each saved)."""
    commands = ForkedCommands({**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    yield commands
    commands.close()


def test_an_unreadable_mlflow_password_file_is_one_line_for_every_command(tmp_path):
    done = sharetune("report", str(tmp_path), cwd=tmp_path, MLFLOW_TRACKING_PASSWORD_FILE="secrets/none")
    assert done.returncode == 2 and done.stderr == ("error: MLFLOW_TRACKING_PASSWORD_FILE: secrets/none: No such file or "
                                                    "directory; give the file that holds the tracking server's password\n")


@pytest.mark.parametrize("args, message", [
    (["search", "SPEC", "--set", "fixed.hidden=[1,"], "error: --set fixed.hidden: not valid YAML"),
    (["search", "SPEC", "--storage", "afile"], "error: --storage: "),
    (["search", "SPEC", "--mlflow-uri", "zzz://x"], "error: --mlflow-uri: no MLflow tracking store"),
    (["search", "SPEC", "--mlflow-uri", "sqlite:x.db"], "error: --mlflow-uri: 'sqlite:x.db' is not a database URL SQLAlchemy knows"),
    (["report", "no-such-experiment", "--mlflow-uri", "zzz://x"], "error: --mlflow-uri: no MLflow tracking store"),
    (["ui", "--mlflow-uri", "zzz://x"], "error: --mlflow-uri: no MLflow tracking store"),
    (["search", "BADSPEC"], "error: spec: "),
    (["train", "arbnet", "--dataset", "synthetic", "--device", "cuda"], "error: --device: cuda is not here"),
    (["train", "spin", "--dataset", "synthetic", "--patch-size", "64"], "error: patch_size: 64 is larger than the 8 x 8 images"),
    (["train", "spin", "--dataset", "synthetic", "--model", "deit_tiny", "--dim", "100", "--patch-size", "4"],
     "error: model (model='deit_tiny', dim=100, patch_size=4): fails on 128x1x8x8 inputs: dim: 100 is not a multiple of "
     "deit_tiny's 3 attention heads; allowed: multiples of 3"),
    (["train", "spin", "--dataset", "mnist1d", "--dim", "8", "--depth", "2"], "error: model (dim=8, depth=2): fails on 128x40 inputs: data: SPIN's models take images"),
    (["train", "spin", "--dataset", "synthetic", "--share-rate", "2", "--components", ","], "error: --components: none given; allowed: pointwise"),
    (["train", "spin", "--dataset", "synthetic", "--dim", "8", "--depth", "4", "--patch-size", "2", "--share-rate", "2",
      "--fusion", "mean"], "error: --pretrain-epochs: fusion and the cka mapping start from the unshared model"),
    (["search", "SPEC", "--set", "optuna_storage=postgresql://u@127.0.0.1:1/db"], "error: optuna_storage: the database did not answer"),
    (["search", "SPEC", "--address", "bogus"], "error: --address bogus: give host:port, ray://host:port, or auto"),
    (["search", "SPEC", "--address", "http://127.0.0.1:8265"], "error: --address http://127.0.0.1:8265: give host:port, "
     "ray://host:port, or auto (an http:// address is the dashboard's, which `sharetune submit` takes)"),
    (["search", "SPEC", "--address", "ray://127.0.0.1:99999"], "error: --address ray://127.0.0.1:99999: give host:port"),
    (["status", "abc", "--address", "bogus"], "error: --address bogus: "),
    (["search", "SPEC", "--report-dir", "afile"], "error: --report-dir: "),
    (["data", "fetch", "mnist", "--root", "afile"], "error: --root: "),
    (["search", "SPEC", "--report-dir", "/proc/sharetune"], "error: --report-dir: /proc is on a read-only or virtual filesystem"),
    (["train", "arbnet", "--dataset", "synthetic", "--out", "/proc/model.pt"], "error: --out: /proc is on a read-only or virtual filesystem"),
    (["search", "SPEC", "--storage", "stored", "--name", "taken"], "error: --name: "),  # it would mix two searches
    (["search", "SPEC", "--storage", ".", "--name", "afile"], "error: --name: "),  # pyarrow's error, once Ray was up
    (["resume", "stored/damaged"], "error: "),
    (["report", "stored/damaged"], "error: "),
    (["list", "--storage", "foo://x"], "error: --storage: "),
    (["list", "--storage", "stored/taken"], "error: --storage: "),  # a search folder: "no searches yet"
    (["search", "SPEC", "--storage", "/proc/sharetune"], "error: --storage: /proc is on a read-only or virtual filesystem"),
    (["train", "arbnet", "--dataset", "synthetic", "--lr", "nan"], "error: --lr: Input should be a finite number"),  # as typed
    (["train", "arbnet", "--dataset", "synthetic", "--img-size", "16"], "error: --img-size: applies to imagefolder, not synthetic"),
    (["train", "arbnet", "--dataset", "synthetic", "--table-size", "100", "--compression", "0.1"],
     "error: --table-size, --compression: give one, not both"),
    (["search", "SPEC", "--set", "data.train_subset=20", "--set", "data.val_fraction=0.01"],
     "error: data.val_fraction: 0.01 of 20 training examples leaves a split empty"),
    (["train", "spin", "--dataset", "synthetic", "--transform-groups", "4"],
     "error: --transform-groups: this run never reads it (it applies where share_rate is above 1); leave it out"),
    (["train", "spin", "--dataset", "synthetic", "--model", "deit_tiny", "--kernel-size", "5"],  # timm's DeiT has no such option
     "error: --kernel-size: this run never reads it (it applies to the models that take it: convmixer, convnext_isotropic); leave it out"),
    (["ui", "--port", "99999"], "error: Invalid value for '--port': Input should be less than or equal to 65535 "
                                "(`sharetune ui --help` says what it takes)"),  # click's usage error: one line too
])
def test_the_cli_says_one_line_and_exits_2(args, message, tmp_path, forked):
    (tmp_path / "afile").write_text("")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (tmp_path / "bad.yaml").write_bytes(b"name: \xff")
    for name, spec in (("taken", yaml.safe_dump(tiny_spec())), ("damaged", "name: [")):
        (tmp_path / "stored" / name).mkdir(parents=True)
        (tmp_path / "stored" / name / "sharetune-spec.yaml").write_text(spec)
    args = [{"SPEC": "spec.yaml", "BADSPEC": "bad.yaml"}.get(a, a) for a in args]
    done = forked.run(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_nothing_writes_into_a_search_folder(tmp_path, forked):
    """`export --out` over a search's spec (or through a link to it) left the search unreadable; a
    report or another search inside one mixes files into it (`report --out` is checked alike)."""
    search = tmp_path / "results" / "done"
    search.mkdir(parents=True)
    (search / "sharetune-spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (tmp_path / "model.pt").symlink_to(search / "sharetune-spec.yaml")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    inside = f"is in (or links into) the search folder {search}, whose files it could replace; give a path outside it"
    for args, option, path in [
        (["export", "results/done", "--trial", "x", "--out", "results/done/sharetune-spec.yaml"], "--out", search / "sharetune-spec.yaml"),
        (["export", "results/done", "--trial", "x", "--out", "model.pt"], "--out", tmp_path / "model.pt"),
        (["train", "arbnet", "--dataset", "synthetic", "--out", "results/done/model.pt"], "--out", search / "model.pt"),
        (["search", "spec.yaml", "--report-dir", "results/done/report"], "--report-dir", "results/done/report"),
        (["search", "spec.yaml", "--storage", "results/done"], "--storage", "results/done"),
    ]:
        done = forked.run(*args, cwd=tmp_path)
        assert (done.returncode, done.stderr) == (2, f"error: {option}: {path} {inside}\n"), args
    done = forked.run("search", "spec.yaml", "--report-dir", "results", cwd=tmp_path)  # reports go to results/NAME
    assert (done.returncode, done.stderr) == (2, "error: --report-dir: results holds the search folders, where a report would "
                                                 "go into its search's own folder; give another folder\n")
    done = forked.run("export", "results/done", "--trial", "x", "--out", "loop.pt", cwd=tmp_path)  # was a traceback
    assert (done.returncode, done.stderr) == (2, f"error: --out: {tmp_path}/loop.pt is a loop of symbolic links; give another path\n")
    assert yaml.safe_load((search / "sharetune-spec.yaml").read_text()) == tiny_spec()
    assert [p.name for p in search.iterdir()] == ["sharetune-spec.yaml"]


def test_the_cli_tells_its_version_and_its_help_reads_in_sentences():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from sharetune.cli import app

    for flag in ("--version", "-V"):
        done = CliRunner().invoke(app, [flag])
        assert done.exit_code == 0 and done.output == f"sharetune {version('sharetune')}\n"
    shown = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output
    assert "Write a trial's deployable model (fused layers folded), settings and input preprocessing to one torch file; load" in shown


@pytest.mark.parametrize(("command", "line"), [
    (["presets", "list"], "error: No such command 'list' (`sharetune presets --help` says what it takes)"),
    (["train", "arbnet", "--epoch", "3"], "error: No such option: --epoch (Possible options: --epochs) (`sharetune train arbnet "
                                          "--help` says what it takes)"),
    (["logs"], "error: Missing argument 'job' (`sharetune logs --help` says what it takes)"),  # a command without torch
])
def test_a_usage_mistake_is_one_line_and_exit_2(tmp_path, command, line):
    """Click's boxed usage was six lines, unlike every other bad input (a walk)."""
    done = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'sharetune'; from sharetune.launch import main; main()",
                           *command], capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert (done.returncode, done.stdout, done.stderr) == (2, "", line + "\n")


def test_no_command_shows_the_help_with_or_without_rich(tmp_path):
    for rich in ("1", "0"):  # rich prints it while click makes its error; click's own error holds it
        done = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'sharetune'; from sharetune.launch import main; main()"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "TYPER_USE_RICH": rich})
        assert done.returncode == 2 and "Usage: sharetune [OPTIONS] COMMAND [ARGS]..." in done.stdout + done.stderr, rich


def test_a_bad_spec_is_answered_before_ray_tune_and_mlflow_load(tmp_path):
    """Loading them takes seconds; a typo in a spec should not wait for them."""
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_spec(sampler="nope")))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sharetune.cli", "search", "bad.yaml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "error: sampler: " in done.stderr, done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not imported & {"ray.tune", "mlflow"}


# No code from files

class Planted:
    """A pickle that, unpickled, writes a marker file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def plant(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "evil": Planted(marker)}, path)
    return path


def test_weights_that_would_run_code_are_refused(tmp_path, synthetic):
    marker = tmp_path / "marker"
    weights = plant(tmp_path / "pretrained.pt", marker)
    with pytest.raises(WeightsError, match="not a state dict torch loads without running code") as refused:
        load_state_dict(weights)
    assert str(refused.value).endswith("(Unsupported global: GLOBAL getattr was not an allowed global by default.)")
    with pytest.raises(WeightsError):
        load_state_dict(weights.read_bytes())
    fused = spin(share_rate=2, fusion="mean", pretrained=str(weights))
    with pytest.raises(SpecError, match="pretrained: .*without running code"):
        check_search(parse_spec(fused), synthetic)

    class Store:  # a search folder whose cached pretrained weights someone replaced
        def read(self, filename):
            return weights.read_bytes()

        def write(self, filename, data):
            raise AssertionError("nothing is written")

    with pytest.raises(WeightsError):
        pretrained_weights(parse_spec(spin(share_rate=2, fusion="mean", pretrain_epochs=1)), synthetic, Store())
    with pytest.raises(pickle.UnpicklingError):  # what a trial's checkpoint load does, as trials/trial.py calls it
        torch.load(weights, weights_only=True)
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the marker is real: unpickling without the guard runs it
    assert marker.read_text() == "ran"


def test_every_torch_load_in_the_package_is_weights_only():
    import ast

    package = Path(__file__).resolve().parents[1] / "sharetune"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                options = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert options.get("weights_only") == "True", f"{path.name}:{node.lineno}: torch.load without weights_only=True"


def test_the_mlflow_queue_of_a_search_on_an_object_store_lives_in_the_private_cache(tmp_path, monkeypatch):
    from sharetune.search.mlflow_queue import queue_path
    from sharetune.search.storage import SearchFolder

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = queue_path(SearchFolder.at("s3://bucket/results", "s-1"))
    assert path.parent == tmp_path / "cache" / "mlflow-queue" and path.name.startswith("s-1-")
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_the_kernel_cache_is_private_and_foreign_libraries_are_rebuilt(tmp_path, monkeypatch):
    if native.table_kernels() is None:
        pytest.skip("no C++ compiler here")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    assert native.table_kernels.__wrapped__() is not None
    assert cache.stat().st_mode & 0o777 == 0o700
    (library,) = cache.glob("table_kernels-*.so")
    assert library.stat().st_uid == os.getuid() and not library.stat().st_mode & 0o022

    def plant_library() -> None:  # a new file: the loaded library stays mapped as it was
        library.unlink()
        library.write_bytes(b"not a library")

    plant_library()
    library.chmod(0o666)  # writable by others, so never loaded
    assert native.table_kernels.__wrapped__() is not None  # rebuilt over it, then loaded
    assert library.stat().st_mode & 0o022 == 0 and library.stat().st_size > 1000
    if os.getuid() == 0:  # root can plant a file another user owns: it is rebuilt too
        plant_library()
        os.chown(library, 12345, 12345)
        assert native.table_kernels.__wrapped__() is not None
        assert library.stat().st_uid == 0
    other = tmp_path / "theirs"
    other.mkdir(mode=0o777)
    other.chmod(0o777)
    if os.getuid() == 0:
        os.chown(other, 12345, 12345)
        monkeypatch.setenv(CACHE_ENV, str(other))
        assert native.table_kernels.__wrapped__() is not None
        assert not list(other.glob("*.so"))  # a folder this user does not own is not used


def test_a_step_that_fits_its_range_in_decimals_is_accepted():
    """0.3 - 0.1 is 0.19999... in floats: a step of 0.2 was refused as wider than the range, which Optuna
    (reading decimals) samples as two values."""
    spec = parse_spec(tiny_spec(dimensions={"sparsity": {"uniform": [0.1, 0.3], "step": 0.2}}))
    assert spec.dimensions["sparsity"].step == 0.2
