import pytest

from toolkit import UserError
from toolkit.config import Config, load_config, parse_overrides, save_config


def test_defaults_and_overrides_are_typed(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: exp\noptim:\n  lr: 0.2\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["optim.lr=1e-3", "data.mean=0.5,0.4,0.3", "train.compile=true", "data.batch_size=16"])
    assert cfg.name == "exp"
    assert cfg.train.epochs == 7
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as str
    assert cfg.data.mean == [0.5, 0.4, 0.3]
    assert cfg.train.compile is True
    assert cfg.data.batch_size == 16
    assert cfg.data.kind == Config().data.kind  # untouched keys keep their defaults


@pytest.mark.parametrize("override, suggestion", [
    ("optim.lrr=0.1", "optim.lr"),
    ("trian.epochs=3", "train.epochs"),
    ("data.batchsize=3", "data.batch_size"),
    ("epochs=3", "train.epochs"),
])
def test_unknown_key_names_the_closest_valid_key(override, suggestion):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert f"'{suggestion}'" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  arc: resnet_small\n")
    with pytest.raises(UserError, match="unknown config key 'model.arc'; did you mean 'model.arch'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=1.5", "'train.epochs' must be int"),
    ("train.epochs=many", "'train.epochs' must be int"),
    ("train.compile=3", "'train.compile' must be bool"),
    ("data.mean=0.5,0.5", "'data.mean' needs 3 values"),
    ("data.kind=mnist", "'data.kind' must be one of shapes, imagefolder, cifar10"),
    ("optim.lr=-1", "'optim.lr' must be positive"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be between 0 and 1"),
    ("data=3", "section 'data' must be a mapping"),
    ("epochs", "must look like key=value"),
])
def test_bad_values_are_one_sentence_naming_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=abc", "optim.name=adamw", "train.grad_accum=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert load_config(None, ["train.out_dir=elsewhere", "name=abc", "optim.name=adamw",
                              "train.grad_accum=2"]).hash() == cfg.hash()  # where it is written is not what
    assert load_config(None, ["name=abc", "optim.name=adamw"]).hash() != cfg.hash()


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=null"]) == {"a": {"b": 1, "c": "x"}, "d": None}


def test_every_repository_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)  # unknown keys or bad values would raise


@pytest.mark.parametrize("override, message", [
    ("train.label_smoothing=1.5", "'train.label_smoothing' must be at least 0 and below 1"),
    ("optim.betas=0.9,0.99,0.5", "'optim.betas' needs two values"),
    ("optim.momentum=-1", "'optim.momentum' must be 0 or more"),
    ("data.crop_padding=-2", "'data.crop_padding' must be 0 or more"),
    ("train.checkpoint_every=-1", "'train.checkpoint_every' must be 0 or more"),
    ("data.memory_limit_gb=0", "'data.memory_limit_gb' must be positive"),
    ("data.num_workers=-3", "'data.num_workers' must be -1"),
    ("train.stop_at_accuracy=2", "'train.stop_at_accuracy' must be at least 0"),
])
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "'seed' must be a whole number from 0 to 4294967295"),
    ("seed=100000000000000000000", "'seed' must be a whole number from 0"),
    ("data.image_size=1000000", "'data.image_size' must be at most 4,096"),
    ("data.batch_size=10000000", "'data.batch_size' must be at most"),
    ("train.epochs=1000000000", "'train.epochs' must be at most"),
    ("optim.lr=.inf", "'optim.lr' must be a finite number"),
    ("optim.lr=1e400", "'optim.lr' must be a finite number"),
    ("data.std=nan,1,1", "'data.std[0]' must be a finite number"),
    ("data.mean=0.5,-.inf,0.5", "'data.mean[1]' must be a finite number"),
    ("train.collective_timeout=0", "'train.collective_timeout' must be positive"),
    ("name=..", "'name' must be a plain folder name"),
    ("name=.", "'name' must be a plain folder name"),
    ("name=a/b", "'name' must be a plain folder name"),
    ("name=a\\b", "'name' must be a plain folder name"),
    ("data.mean=" + ",".join(["1"] * 10_000), "'data.mean' must be a short list"),
])
def test_numbers_sizes_and_names_are_checked_where_they_enter(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as e:
        load_config(None, [override])
    assert len(str(e.value)) < 200  # a short prefix of the value at most


@pytest.mark.parametrize("value", ["x" * 100_000, "9" * 5000])
def test_error_messages_show_only_a_short_prefix_of_a_value(value):
    for override in (f"data.kind={value}", f"seed={value}", f"{value}=1"):
        with pytest.raises(UserError) as e:
            load_config(None, [override])
        assert len(str(e.value)) < 300


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path):
    import time

    lines = ["name: ok", "data:", "  root: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(9):  # 9^10 strings once expanded, from a few hundred bytes
        a, b = chr(ord("a") + i), chr(ord("a") + i + 1)
        lines.append(f"x{i}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(UserError, match="YAML aliases .* are not supported") as e:
        load_config(path)
    assert time.perf_counter() - start < 1.0 and len(str(e.value)) < 200
    with pytest.raises(UserError, match="not supported"):
        load_config(None, ["data.root=&x [*x]"])
    tagged = tmp_path / "code.yaml"
    tagged.write_text("name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(tagged)


def test_run_name_never_leaves_the_output_folder(tmp_path):
    from toolkit.train import resolve_run_dir

    for name in ("..", "../x", "/abs"):
        with pytest.raises(UserError, match="plain folder name"):
            load_config(None, [f"name={name}", f"train.out_dir={tmp_path}", "train.resume=auto"])
    cfg = load_config(None, ["name=..hidden..", f"train.out_dir={tmp_path}", "train.resume=auto"])
    assert resolve_run_dir(cfg).parent == tmp_path  # dots inside a name are fine
