import pytest
import yaml

from mumic.config import FIELDS, GROUPS, TrainConfig, load_config, save_config
from mumic.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("backbone: lite\nlr_head: 0.01\nepochs: 3\ntemplates: ['a {}']\nlearn_tau: false\n")
    cfg = load_config(p, {"epochs": "5", "seed": None})
    assert cfg.lr_head == 0.01 and cfg.epochs == 5 and cfg.templates == ["a {}"] and cfg.learn_tau is False
    assert cfg.seed == 0  # None override ignored


def test_round_trip(tmp_path):
    cfg = load_config(overrides={"manifest": "m.csv", "bias": "per_label", "tau": 0.05})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "text, match",
    [
        ("lr_hed: 0.1\n", r"unknown key 'lr_hed' \(did you mean 'lr_head'\?\)"),
        ("epochs: many\n", "key 'epochs' must be an integer"),
        ("epochs: 1.5\n", "key 'epochs' must be an integer"),
        ("loss: focal\n", "key 'loss' is 'focal'; choose one of"),
        ("learn_tau: maybe\n", "key 'learn_tau' must be true or false"),
        ("tau: -1\n", "key 'tau' must be > 0"),
        ("batch_size: 0\n", "key 'batch_size' must be at least 1"),
        ("templates: 3\n", "key 'templates' must be a list of strings"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value)


def test_bad_override_names_command_line():
    with pytest.raises(ConfigError, match="command line: unknown key 'nope'"):
        load_config(overrides={"nope": 1})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_tau():
    assert TrainConfig().resolved_tau(None) == 0.07
    assert TrainConfig().resolved_tau(50.0) == pytest.approx(0.02)
    assert TrainConfig().resolved_tau(1000.0) == pytest.approx(0.01)  # 1/tau clamped at 100
    assert TrainConfig(loss="tempered_sigmoid_fixed").resolved_tau(50.0) == 1.0
    assert TrainConfig(tau=0.2).resolved_tau(50.0) == 0.2


def _other_value(name, f, default):
    """A valid value of the field that is not its default."""
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, list):
        return ["an image of {}", "{}, drawn"]
    if isinstance(default, (int, float)):
        return default + 3
    others = {"backbone": "hf:some-org/some-model", "image_size": 96, "max_steps": 7, "tau": 0.25, "learn_tau": False}
    return others.get(name, f"{name}.txt")


def test_every_key_survives_save_and_load_in_order(tmp_path):
    default = TrainConfig()
    values = {name: _other_value(name, f, getattr(default, name)) for name, f in FIELDS.items()}
    cfg = load_config(overrides=values)
    assert all(getattr(cfg, k) != getattr(default, k) for k in FIELDS)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert list(yaml.safe_load(text)) == list(FIELDS)  # the flat keys, in the order of --help
    assert load_config(tmp_path / "config.yaml") == cfg


def test_groups_cover_every_setting_once():
    names = [k for keys in GROUPS.values() for k in keys]
    assert sorted(names) == sorted(FIELDS) and len(names) == len(set(names))
    cfg = load_config(overrides={"lr_head": 0.5, "backbone": "lite"})
    assert cfg.group("optimisation")["lr_head"] == 0.5 and "backbone" not in cfg.group("optimisation")
    assert cfg.group("model")["backbone"] == "lite"
    with pytest.raises(ConfigError, match="unknown settings group 'optim'"):
        cfg.group("optim")


def test_local_hf_directory_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert load_config(overrides={"backbone": "hf:models/tiny"}).backbone == f"hf:{tmp_path / 'models' / 'tiny'}"
    (tmp_path / "c.yaml").write_text("backbone: hf:./models/tiny\n")
    assert load_config("c.yaml").backbone == f"hf:{tmp_path / 'models' / 'tiny'}"
    # a hub name (no such folder here) and the lite backbone are kept as given
    assert load_config(overrides={"backbone": "hf:openai/clip-vit-base-patch32"}).backbone == "hf:openai/clip-vit-base-patch32"
    assert load_config(overrides={"backbone": "lite"}).backbone == "lite"


def test_tau_learns_by_default_only_where_the_backbone_brings_a_logit_scale():
    cfg = load_config(overrides={"backbone": "lite"})
    assert cfg.learn_tau is None
    assert cfg.resolved_learn_tau(None) is False and cfg.resolved_tau(None) == 0.07  # lite: tau fixed at 0.07
    assert cfg.resolved_learn_tau(100.0) is True and cfg.resolved_tau(100.0) == pytest.approx(0.01)  # CLIP: learned from 1/100
    assert load_config(overrides={"learn_tau": True}).resolved_learn_tau(None) is True
    assert load_config(overrides={"learn_tau": False}).resolved_learn_tau(100.0) is False
