"""Input hygiene: label names that only look different, label counts that would cost hours,
YAML that expands far beyond its size, and settings that are not finite numbers."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import pytest

from mumic.config import TrainConfig, load_config, save_config
from mumic.data import labels as labels_mod
from mumic.data.labels import normalize_label, read_labels_file
from mumic.data.manifest import read_manifest
from mumic.errors import ConfigError, ManifestError, RunError
from mumic.run import read_run

NFC = "caf\u00e9"
NFD = unicodedata.normalize("NFD", NFC)
ZWSP = "\u200b"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fake_run(folder: Path, labels: list[dict], thresholds: dict | None = None) -> Path:
    """A run folder that read_run accepts (it validates files, not weights)."""
    folder.mkdir()
    save_config(TrainConfig(), folder / "config.yaml")
    (folder / "model.safetensors").write_bytes(b"")
    meta = {"format": "mumic-run-1", "labels": labels, "templates": [], "model": {"backbone": {"spec": "lite"}, "tau": 0.07}}
    write(folder / "labels.json", json.dumps(meta))
    if thresholds is not None:
        write(folder / "thresholds.json", json.dumps(thresholds))
    return folder


# ============================================================================ look-alike labels


@pytest.mark.parametrize(
    "raw,canonical",
    [
        (NFD, NFC),
        (f"cat{ZWSP}", "cat"),
        (f"\ufeff{ZWSP}black{ZWSP}  \t cat ", "black cat"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\u200fright-to-left mark", "right-to-left mark"),
        ("no\u00a0break", "no break"),
        ("a\u200b\u0301", "\u00e1"),  # the accent composes once the zero-width space between is gone
        # kept: ZWJ emoji sequences, ZWNJ in Persian, tag characters of subdivision flags
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f468\u200d\U0001f469\u200d\U0001f467"),
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),
        ("\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
         "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"),
        ("Cat", "Cat"),  # case is kept (a clash is only warned about)
    ],
)
def test_label_names_are_normalised(raw: str, canonical: str) -> None:
    assert normalize_label(raw) == canonical
    assert normalize_label(canonical) == canonical  # idempotent


def test_manifest_and_labels_file_labels_normalise_identically(tmp_path: Path) -> None:
    # the labels file spells café decomposed, the manifest precomposed, with stray spaces and a zero-width space
    specs, _ = read_labels_file(write(tmp_path / "labels.yaml", f"- {NFD}\n- 'black  cat'\n- dog{ZWSP}\n"))
    names = [s.name for s in specs]
    assert names == [NFC, "black cat", "dog"]
    m = read_manifest(write(tmp_path / "m.csv", f"image,labels\na.png,{NFC}| black cat\nb.png,dog|{NFD}\nc.png,black{ZWSP} cat\n"))
    assert m.labels == [[NFC, "black cat"], ["dog", NFC], ["black cat"]]
    targets, _ = m.targets(names)
    assert targets.tolist() == [[1, 1, 0], [1, 0, 1], [0, 1, 0]]


def test_look_alike_labels_in_a_labels_file_are_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.json", json.dumps([NFC, NFD, "x"]))
    with pytest.raises(ManifestError, match=f"duplicate label name\\(s\\): {NFC} "):
        read_labels_file(path)


def test_case_only_clashes_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        specs, _ = read_labels_file(write(tmp_path / "labels.yaml", "- Cat\n- cat\n- dog\n"))
    assert [s.name for s in specs] == ["Cat", "cat", "dog"]
    assert "'Cat' / 'cat'" in caplog.text and "differ only in case" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_manifest(write(tmp_path / "m.csv", "image,labels\na.png,Dog\nb.png,dog|cat\n"))
    assert "'Dog' / 'dog'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_manifest(write(tmp_path / "ok.csv", "image,labels\na.png,dog\nb.png,dog|cat\n"))
    assert "differ only in case" not in caplog.text


def test_a_run_reads_its_labels_and_thresholds_normalised(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", [{"name": NFD, "seen": True}, {"name": f"dog{ZWSP}", "seen": True}],
                   {"per_label": {NFD: 0.25}, "default": 0.5})
    files = read_run(run)
    assert [s.name for s in files.labels] == [NFC, "dog"]
    assert files.thresholds["per_label"] == {NFC: 0.25}


def test_look_alike_labels_in_a_run_are_duplicates(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", [{"name": NFC, "seen": True}, {"name": NFD, "seen": True}])
    with pytest.raises(RunError, match="duplicate label names"):
        read_run(run)


def test_zero_shot_label_names_are_normalised() -> None:
    from mumic.data.labels import LabelSpec
    from mumic.model import MuMIC

    class Stub:
        labels = [LabelSpec(name=NFC)]

    out = MuMIC.resolve_labels(Stub(), [NFD, f" new{ZWSP}  label "])  # type: ignore[arg-type]
    assert out[0] is Stub.labels[0]
    assert (out[1].name, out[1].seen) == ("new label", False)


# ============================================================================ label counts


def test_a_labels_file_with_too_many_labels_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labels_mod, "MAX_LABELS", 50)
    assert len(read_labels_file(write(tmp_path / "ok.json", json.dumps([f"l{i}" for i in range(50)])))[0]) == 50
    with pytest.raises(ManifestError, match=r"big.json: 51 labels; at most 50 are supported"):
        read_labels_file(write(tmp_path / "big.json", json.dumps([f"l{i}" for i in range(51)])))


def test_a_manifest_with_too_many_labels_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mumic.data.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "MAX_LABELS", 3)
    with pytest.raises(ManifestError, match=r"m.csv: 4 distinct labels; at most 3 are supported"):
        read_manifest(write(tmp_path / "m.csv", "image,labels\na.png,a|b\nb.png,c|d\n"))


def test_a_run_with_too_many_labels_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mumic.run as run_mod

    monkeypatch.setattr(run_mod, "MAX_LABELS", 5)
    run = fake_run(tmp_path / "run", [{"name": f"l{i}", "seen": True} for i in range(6)])
    with pytest.raises(RunError, match=r"labels.json holds 6 labels; a run may hold at most 5"):
        read_run(run)


def test_the_label_cap_is_the_one_named_constant() -> None:
    import mumic.data.manifest as manifest_mod
    import mumic.run as run_mod

    assert run_mod.MAX_LABELS is manifest_mod.MAX_LABELS is labels_mod.MAX_LABELS == 100_000


# ============================================================================ YAML aliases and echoed values


def _alias_levels(levels: int) -> str:
    """A config whose last key aliases a value of 9**levels strings, in a few hundred bytes."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nepochs: [" + ", ".join([f"*l{levels - 1}"] * 9) + "]\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.yaml", _alias_levels(4))  # 9**5 = 59049 strings from ~400 bytes
    # expanded: l0 = 1 + 9 = 10 nodes, l1 = 1 + 9 * 10 = 91, l2 = 820, l3 = 7381, epochs = 66430; with the
    # mapping and its 5 keys 74738 nodes, of which 20 are written out (mapping, keys, l0's 10, 4 lists)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg == (f"{path}: YAML aliases (*name) expand this document by 74718 values, more than 10000; "
                   "write the values out instead of aliasing them")
    # the same in a labels file, and an alias of a value that contains itself
    with pytest.raises(ManifestError, match="YAML aliases"):
        read_labels_file(write(tmp_path / "bomb_labels.yaml", _alias_levels(4)))
    with pytest.raises(ConfigError, match=r"loop.yaml line 1: a YAML alias refers to a value that contains it"):
        load_config(write(tmp_path / "loop.yaml", "templates: &t [*t]\n"))


def test_a_few_aliases_still_work_and_merge_keys_stay_refused(tmp_path: Path) -> None:
    specs, _ = read_labels_file(write(tmp_path / "labels.yaml", "cat: {prompts: &p [a pet, an animal]}\ndog: {prompts: *p}\n"))
    assert [s.prompts for s in specs] == [["a pet", "an animal"]] * 2
    with pytest.raises(ConfigError, match="not valid YAML .*merge"):
        load_config(write(tmp_path / "merge.yaml", "a: &a {x: 1}\nb:\n  <<: *a\n"))


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("epochs: " + "9" * 5000 + "x\n", "key 'epochs' must be an integer, got '99999"),
        ("templates: [" + ", ".join(["[a]"] * 3000) + "]\n", "key 'templates' must be a list of strings, got [['a'], "),
        ("loss: " + "z" * 5000 + "\n", "key 'loss' is 'zzzz"),
        ("z" * 900 + ": 1\n", "unknown key 'zzzz"),
        ("epochs: 1\nepochs" + "" + ": 2\n", "key 'epochs' is given twice"),
    ],
)
def test_values_echoed_in_config_errors_are_cut(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert fragment in msg, msg
    assert len(msg) < len(str(path)) + 300, msg


def test_values_echoed_in_labels_file_errors_are_cut(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        read_labels_file(write(tmp_path / "l.json", json.dumps({"labels": {"cat": {"seen": "x" * 10_000}}})))
    msg = str(info.value)
    assert "seen must be true or false, got 'xxx" in msg and msg.endswith("…") and len(msg) < 200, msg


# ============================================================================ finite settings


@pytest.mark.parametrize("key", ["lr_head", "lr_tower", "lr_temp", "weight_decay", "tau"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_float_settings_must_be_finite(key: str, value, tmp_path: Path) -> None:
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: value})
    assert str(info.value) == f"command line: key '{key}' ({flag}) must be a finite number, got {float(value)}"
    text = value if isinstance(value, str) else repr(value)
    path = write(tmp_path / "c.yaml", f"{key}: {text}\n".replace("inf", ".inf").replace("nan", ".nan"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path} line 1: key '{key}' must be a finite number, got {float(value)}"


def test_finite_float_settings_still_load() -> None:
    cfg = load_config(overrides={"lr_head": "1e-3", "weight_decay": 0, "tau": 0.05})
    assert (cfg.lr_head, cfg.weight_decay, cfg.tau) == (1e-3, 0.0, 0.05)
