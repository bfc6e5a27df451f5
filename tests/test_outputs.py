"""What a command reads and what it may write: one writer per run folder, the inputs a
batch command takes (files, folders, patterns, manifests) and outputs that are never
replaced by accident."""

import os
import signal
import subprocess
import sys

import pytest

from mumic.cli import main
from mumic.data.inputs import inputs_manifest
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ImageError, ManifestError, RunError
from mumic.io import LOCK_NAME, folder_lock
from mumic.train import fit, resume

# Holds FOLDER's lock, says so on stdout, and lets go when a line arrives on stdin.
HOLDER = (
    "import sys\n"
    "from mumic.io import folder_lock\n"
    "with folder_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.readline()\n"
)


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path/run's lock; `release()` lets it go."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"  # the handshake: it holds the lock from here on

    def release():
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0

    proc.release = release
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(holder, tmp_path):
    run, proc = holder
    refused = rf"{run} is being written by process {proc.pid} \(.*{LOCK_NAME}\); wait for it or stop it"
    with pytest.raises(RunError, match=refused), folder_lock(run):
        pass
    # train --resume into the folder: refused before anything is read or written
    (run / "config.yaml").write_text("placeholder: 1\n")
    with pytest.raises(RunError, match=f"process {proc.pid}"):
        resume(run, progress=False)
    # a fresh train with --overwrite: refused before the folder is cleared
    root = make_shapes(tmp_path / "shapes", n=12, size=32, seed=1).parent
    with pytest.raises(RunError, match=f"process {proc.pid}"):
        fit(manifest=str(root / "manifest.csv"), labels_file=str(root / "labels.yaml"), out=str(run), overwrite=True, progress=False)
    assert (run / "config.yaml").read_text() == "placeholder: 1\n"
    proc.release()
    assert not (run / LOCK_NAME).exists()  # the holder removed its lock file on the way out
    with folder_lock(run) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_the_command_line_names_the_holder_in_one_line(holder):
    run, proc = holder
    (run / "config.yaml").write_text("placeholder: 1\n")
    p = subprocess.run([sys.executable, "-m", "mumic", "train", "--resume", str(run), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("mumic: error:")]
    assert len(errors) == 1 and f"being written by process {proc.pid}" in errors[0], p.stderr


def test_a_lock_left_by_a_killed_process_does_not_block(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(proc.pid)  # its file stays behind, its lock does not
    with folder_lock(run):
        pass
    assert not (run / LOCK_NAME).exists()


# --------------------------------------------------------------------------- inputs


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, format="PNG")
    return path


def test_folders_and_patterns_give_their_images_sorted_in_the_order_given(tmp_path):
    photos = tmp_path / "photos"
    b, a, c = _png(photos / "b.png"), _png(photos / "a.JPG"), _png(photos / "sub" / "c.webp")
    (photos / "notes.txt").write_text("not an image")
    (photos / "sub" / "d.heic").write_bytes(b"")
    single = _png(tmp_path / "z.png")
    m = inputs_manifest([single, photos])
    assert m.images == [single.resolve(), a.resolve(), b.resolve(), c.resolve()]
    m = inputs_manifest([str(photos / "*.png"), str(photos / "**" / "*.webp"), single])
    assert m.images == [b.resolve(), c.resolve(), single.resolve()]
    assert m.frame["image"].tolist() == [str(p) for p in m.images]


def test_an_empty_folder_or_a_pattern_matching_nothing_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"empty: no image files in this folder or below \(\.jpg"):
        inputs_manifest([tmp_path / "empty"])
    with pytest.raises(ManifestError, match=r"nothing-\*\.png: the pattern matches no image, folder or manifest$"):
        inputs_manifest([str(tmp_path / "nothing-*.png")])
    with pytest.raises(ManifestError, match=r"\*\.txt: the pattern matches no image.*1 other files"):
        inputs_manifest([str(tmp_path / "empty" / "sub" / "*.txt")])


def test_a_missing_image_is_reported_against_its_own_path(tmp_path):
    cat = _png(tmp_path / "cat.png")
    hill = tmp_path / "hill_sunset.jpg"
    with pytest.raises(ImageError) as e:
        inputs_manifest([cat, hill]).check_images_exist()
    assert str(e.value) == f"image not found: {hill} (1 of 2 images are missing)"
    # a row of the second manifest is named by that manifest's file and line
    (tmp_path / "one.csv").write_text("image\ncat.png\n")
    (tmp_path / "two.csv").write_text("image\ncat.png\nhill_sunset.jpg\n")
    with pytest.raises(ImageError, match=rf"^{tmp_path / 'two.csv'} line 3: image not found: {hill} "):
        inputs_manifest([tmp_path / "one.csv", cat, tmp_path / "two.csv"]).check_images_exist()


def test_one_manifest_alone_reads_as_it_does_for_embed(tmp_path):
    _png(tmp_path / "cat.png")
    (tmp_path / "m.csv").write_text("labels,image,note\ncat,cat.png,hello\n")
    got, want = inputs_manifest([tmp_path / "m.csv"]), read_manifest(tmp_path / "m.csv", require_labels=False)
    assert (got.path, got.images, got.lines, got.labels) == (want.path, want.images, want.lines, want.labels)
    assert got.frame.equals(want.frame)


# --------------------------------------------------------------------------- outputs (checked before the run is read)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("verb", ["predict", "embed"])
def test_a_finished_output_is_not_replaced_without_overwrite(verb, tmp_path, capsys):
    _png(tmp_path / "photos" / "cat.png")
    out = tmp_path / "emb.parquet"
    out.write_bytes(b"108 rows")
    code, err = _cli(capsys, verb, tmp_path / "no-run", tmp_path / "photos", "--out", out)
    assert code == 2 and err.strip() == f"mumic: error: {out} already exists; pass --overwrite to replace it, or choose another --out"
    assert out.read_bytes() == b"108 rows"
    # with --overwrite the output check passes: the next problem is the missing run
    code, err = _cli(capsys, verb, tmp_path / "no-run", tmp_path / "photos", "--out", out, "--overwrite")
    assert code == 2 and "no-run" in err and "already exists" not in err


@pytest.mark.parametrize("verb", ["predict", "embed"])
def test_an_input_is_never_the_output(verb, tmp_path, capsys):
    cat = _png(tmp_path / "cat.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\ncat.png\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "labels.json").write_text("{}")
    for out, what in ((manifest, "a manifest given as input"), (cat, "an image of the input"), (run / "labels.json", "a file of the run")):
        code, err = _cli(capsys, verb, run, manifest, "--out", out, "--overwrite")
        assert code == 2 and f"--out {out} is {what}" in err, err
    assert manifest.read_text() == "image\ncat.png\n" and (run / "labels.json").read_text() == "{}"
    # the same file reached by another spelling of its path
    code, err = _cli(capsys, verb, run, manifest, "--out", tmp_path / "sub" / ".." / "m.csv", "--overwrite")
    assert code == 2 and "is a manifest given as input" in err, err


def test_evaluate_and_data_verbs_refuse_to_replace_without_overwrite(tmp_path):
    import subprocess
    import sys

    def mumic(*args):
        return subprocess.run([sys.executable, "-m", "mumic", *map(str, args)], capture_output=True, text=True, timeout=300)

    assert mumic("data", "shapes", "--out", tmp_path / "s", "-n", 20).returncode == 0
    before = (tmp_path / "s" / "manifest.csv").read_bytes()
    assert mumic("data", "shapes", "--out", tmp_path / "s", "-n", 20).returncode == 0  # the same set: reused
    p = mumic("data", "shapes", "--out", tmp_path / "s", "-n", 24)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "s" / "manifest.csv").read_bytes() == before
    assert mumic("data", "shapes", "--out", tmp_path / "s", "-n", 24, "--overwrite").returncode == 0
    assert len((tmp_path / "s" / "manifest.csv").read_text().splitlines()) == 25


def test_evaluate_refuses_an_existing_metrics_file(tmp_path):
    from mumic.errors import ConfigError
    from mumic.evaluate import evaluate_run

    out = tmp_path / "m.json"
    out.write_text("{}")
    with pytest.raises(ConfigError, match=r"m\.json already exists; pass --overwrite"):
        evaluate_run(tmp_path / "no-run", tmp_path / "no.csv", out=out, overwrite=False)
    assert out.read_text() == "{}"
