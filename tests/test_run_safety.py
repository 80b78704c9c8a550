"""Run safety: a failed or mistaken command leaves an existing run directory byte-identical, no run is ever lost (a
replaced run is deleted only at the new run's first checkpoint, whatever kills it before), resuming refuses a
different run, SIGTERM stops a run with a checkpoint that the same command continues exactly, an output directory
belongs to one run, and every bad input ends in one clean line (exit 2)."""

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dinoseg.cli import main
from dinoseg.data import make_dataset
from dinoseg.data.check import check_dataset
from dinoseg.data.io import DatasetError
from dinoseg.engine import checkpoint as checkpoint_module
from dinoseg.engine.checkpoint import BEST, LAST
from dinoseg.engine.config import Resume
from dinoseg.engine.files import write_atomically
from dinoseg.engine.rundir import REPLACED, RESTORING, RunDirectory

from ._data_layouts import make_cityscapes, make_folder
from .engine_utils import (
    assert_same_head,
    go,
    read_checkpoint,
    run_cli,
    start_paused,
    tiny,
    wait_paused,
)

HUB = ["model.dino_hub=dinov3_vits16", "model.backbone_kwargs={}", "model.random_init=false"]  # not TINY's random ViT


def snapshot(directory) -> dict | None:
    """Every file and folder under `directory` (hidden ones too) with the sha256 of its bytes; None when `directory`
    does not exist (a failed command must leave all of it as it was)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(directory.rglob("*"))}


def error_of(capsys, args, code=2) -> str:
    got = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "dinoseg: error:" in line or "Traceback" in line]
    assert got == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dinoseg: error: "), err[-2000:]  # one line, on its own line
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 8-iteration run (checkpoints at 4 and 8, validation at 8) to attempt mistakes on."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *tiny(out, total_iter=8, checkpoint_interval=4)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run (the lock is per directory, the bytes are compared per test)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    config = (out / "segmentation_config.yaml").read_text().replace(str(finished_run), str(out))
    (out / "segmentation_config.yaml").write_text(config)
    return out


def train_args(out, *extra, total=8):
    return ["train", *tiny(out, total_iter=total, checkpoint_interval=4), *extra]


@pytest.mark.parametrize("mistake, message", [
    # overwrite_output_dir: the previous run is only removed once everything else has been checked
    (["datasets.train=ADE20K:split=TRAIN:root=/nonexistent/ade", "overwrite_output_dir=true"], "/nonexistent/ade"),
    # dataset options: a missing root, a value of the wrong type (checked before the dataset is built)
    (["datasets.train=ADE20K:split=TRAIN", "overwrite_output_dir=true"], "ADE20K needs a root (the dataset folder)"),
    (["datasets.val=Synthetic:split=VAL:num_samples=abc", "overwrite_output_dir=true"],
     "SyntheticShapes option num_samples='abc' must be an integer"),
    ([*HUB, "model.pretrained_weights=/missing/w.pth",
      "overwrite_output_dir=true"], "/missing/w.pth: checkpoint file not found"),
    (["train.bach_size=2"], "train.bach_size"),
    (["model.backbone_kwargs.depth=6", "train.resume=true"], "model.backbone_kwargs.depth: 4 in the checkpoint, 6 now"),
    (["model.random_init_seed=3", "train.resume=true"], "model.random_init_seed: 0 in the checkpoint, 3 now"),
    (["decoder_head.backbone_out_layers=FOUR_LAST", "train.resume=true"], "decoder_head.backbone_out_layers: 'LAST'"),
    (["train.batch_size=2", "train.resume=true"], "train.batch_size: 4 in the checkpoint, 2 now"),
    (["optimizer.lr=0.5", "train.resume=true"], "optimizer.lr: 0.01 in the checkpoint, 0.5 now"),
    (["scheduler.total_iter=6", "eval.eval_interval=6", "train.resume=true"], "scheduler.total_iter=6: the run in"),
    ([], "already holds a run (checkpoint_last.pth at iteration 8)"),
    (["train.resume=true", "overwrite_output_dir=true"], "contradict"),
])
def test_a_mistaken_train_leaves_the_run_byte_identical(run_copy, capsys, mistake, message):
    before = snapshot(run_copy)
    line = error_of(capsys, train_args(run_copy, *mistake))
    assert message in line
    assert snapshot(run_copy) == before


def test_a_bad_resume_checkpoint_leaves_the_run_byte_identical(run_copy, capsys):
    (run_copy / LAST).write_bytes((run_copy / LAST).read_bytes()[:1000])  # truncated
    before = snapshot(run_copy)
    assert "not a readable PyTorch checkpoint" in error_of(capsys, train_args(run_copy, "train.resume=true"))
    assert snapshot(run_copy) == before
    ckpt = read_checkpoint(run_copy / BEST)
    del ckpt["optimizer"]
    torch.save(ckpt, run_copy / LAST)
    before = snapshot(run_copy)
    assert "not a dinoseg training checkpoint (no optimizer)" in error_of(capsys, train_args(run_copy, "train.resume=true"))
    assert snapshot(run_copy) == before


def test_resume_allows_bookkeeping_changes_and_records_them(run_copy, capsys, caplog):
    caplog.set_level(logging.INFO, logger="dinoseg")
    assert main(train_args(run_copy, "train.resume=true", "train.log_interval=2", total=12)) == 0
    assert read_checkpoint(run_copy / LAST)["iteration"] == 12
    saved = (run_copy / "segmentation_config.yaml").read_text()
    assert "total_iter: 12" in saved and "log_interval: 2" in saved  # the saved config is what the run used
    assert "changed: scheduler.total_iter: 8 -> 12" in caplog.text


def test_resume_without_a_checkpoint_names_the_path(tmp_path, capsys):
    out = tmp_path / "fresh"
    line = error_of(capsys, train_args(out, "train.resume=true"))
    assert f"{out / LAST} not found" in line
    assert not out.exists()  # a failed start creates nothing


def test_overwrite_replaces_the_run_files_only(run_copy):
    (run_copy / "notes.txt").write_text("mine")
    old_best = (run_copy / BEST).read_bytes()
    assert main(train_args(run_copy, "overwrite_output_dir=true", "eval.eval_interval=4", total=4)) == 0
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert read_checkpoint(run_copy / LAST)["iteration"] == 4
    assert (run_copy / BEST).read_bytes() != old_best
    log = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in log) == 4  # the old run's lines are gone


def test_a_second_training_into_a_directory_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "busy"
    first = start_paused(train_args(out, total=8), tmp_path / "first", step=1)  # holds the directory until killed
    try:
        wait_paused(first, tmp_path / "first")
        started = time.time()
        second = run_cli(train_args(out, "overwrite_output_dir=true"), timeout=120)
        assert second.returncode == 2
        assert f"output_dir={str(out)!r} is in use by another dinoseg process" in second.stderr
        assert time.time() - started < 60  # refused before building anything expensive... or waiting
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The kernel released the lock with the killed process: no stale lock to delete by hand.
    assert main(train_args(out, "overwrite_output_dir=true", total=4)) == 0


FAILS_EARLY = {  # a run that fails at its first batches, before its first checkpoint (at iteration 4)
    "a diverging loss": lambda root: ["optimizer.lr=1e30"],
    "an unreadable image": lambda root: [f"datasets.train=Folder:root={root}", f"datasets.val=Folder:root={root}",
                                         "decoder_head.num_classes=3"],
}


def broken_folder(root):
    make_folder(root, stems=("a", "b", "c", "d"), size=(32, 32))
    (root / "images" / "c.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("failure", FAILS_EARLY)
def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(run_copy, tmp_path, capsys, failure):
    before = snapshot(run_copy)
    bad = FAILS_EARLY[failure](broken_folder(tmp_path / "data"))
    line = error_of(capsys, train_args(run_copy, "overwrite_output_dir=true", *bad))
    assert "no checkpoint written: the run is undone" in line or "c.png: unreadable" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("failure", FAILS_EARLY)
def test_a_run_that_fails_before_its_first_checkpoint_starts_again_with_the_same_command(tmp_path, capsys, failure):
    bad = FAILS_EARLY[failure](broken_folder(tmp_path / "data"))
    new = tmp_path / "new"  # a directory the run creates: it goes again
    error_of(capsys, train_args(new, *bad))
    assert snapshot(new) is None
    mine = tmp_path / "mine"  # a directory with the user's own files: they stay, byte-identical
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    error_of(capsys, train_args(mine, *bad))
    assert snapshot(mine) == before
    # The same command, the data fixed: no flag needed (resume=true has nothing to resume: that stays an error).
    assert "no checkpoint to resume from" in error_of(capsys, train_args(mine, "train.resume=true", total=4))
    assert main(train_args(mine, total=4)) == 0
    assert read_checkpoint(mine / LAST)["iteration"] == 4


def test_a_killed_overwrite_is_undone_by_the_next_train_into_the_directory(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    paused = tmp_path / "paused"
    proc = start_paused(train_args(run_copy, "overwrite_output_dir=true"), paused, step=1)  # before its checkpoint
    wait_paused(proc, paused)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The old run is moved aside, not deleted, while the new one has no checkpoint.
    assert read_checkpoint(run_copy / REPLACED / LAST)["iteration"] == 8
    assert not (run_copy / LAST).exists()
    # The next train into the directory (here a mistaken one) puts it back first.
    assert "already holds a run (checkpoint_last.pth at iteration 8)" in error_of(capsys, train_args(run_copy))
    assert snapshot(run_copy) == before


class Killed(BaseException):
    """A kill: nothing after it runs (the cleanup of a failing write does, which only removes its temporary file)."""


def kill_after_steps(monkeypatch, n: int) -> None:
    """Renames and folder deletions are the steps of a replacement: the (n+1)-th one kills the process instead."""
    calls = {"n": 0}

    def step(real):
        def run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n:
                raise Killed()
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(os, "replace", step(os.replace))
    monkeypatch.setattr(shutil, "rmtree", step(shutil.rmtree))


def old_run(out):
    out.mkdir()
    for name, text in (("config.yaml", "old config"), (LAST, "old last"), (BEST, "old best"), ("metrics.jsonl", "old"),
                       ("notes.txt", "the user's")):
        (out / name).write_text(text)
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("old events")
    return snapshot(out)


def replace_run(run: RunDirectory, *, reaches_a_checkpoint: bool) -> None:
    """What `train ... overwrite_output_dir=true` does to the directory: a new run that writes its first checkpoint
    (the old run is deleted then), or one that fails before it (the old run is put back)."""
    run.check(resume=Resume.FALSE, overwrite=True)
    run.start("new config", new_run=True)
    (run.path / "metrics.jsonl").write_text("new")
    (run.path / "tensorboard").mkdir()
    if reaches_a_checkpoint:
        write_atomically(run.path / LAST, lambda f: f.write(b"new last"))
        run.commit()
    else:
        run.undo()


@pytest.mark.parametrize("reaches_a_checkpoint", [False, True])
def test_a_replacement_killed_at_any_step_is_finished_or_undone_by_the_next_train(tmp_path, monkeypatch,
                                                                                   reaches_a_checkpoint):
    """Kill the replacement of a run at each of its steps in turn (moving the old files aside, writing the new config,
    the new run's first checkpoint, deleting the old files or putting them back); the next train into the directory
    finds either the old run, whole, or (once the new run's checkpoint is there) the new one alone."""
    reference = tmp_path / "uninterrupted"
    old_run(reference)
    replace_run(RunDirectory(reference, "config.yaml", ("tensorboard",)), reaches_a_checkpoint=reaches_a_checkpoint)
    replaced = snapshot(reference)
    steps = 0
    while True:
        out = tmp_path / f"killed_at_{steps}"
        before = old_run(out)
        run = RunDirectory(out, "config.yaml", ("tensorboard",))
        with monkeypatch.context() as m:
            kill_after_steps(m, steps)
            try:
                replace_run(run, reaches_a_checkpoint=reaches_a_checkpoint)
                killed = False
            except Killed:
                killed = True
        run.release()  # the kernel's part when a process dies
        RunDirectory(out, "config.yaml", ("tensorboard",)).check(resume=Resume.FALSE, overwrite=True)  # the next train
        assert not (out / REPLACED).exists() and not (out / RESTORING).exists()
        if (out / LAST).read_bytes() == b"new last":
            assert reaches_a_checkpoint and snapshot(out) == replaced, steps
        else:
            assert snapshot(out) == before, steps
        if not killed:
            break
        steps += 1
    assert steps >= 8  # each file moved aside (and back), the config, the checkpoint, the deletion


def test_sigterm_stops_the_run_with_a_checkpoint_and_the_same_command_continues_exactly(tmp_path):
    """SLURM signals every process of a job, data-loader workers too: the group gets SIGTERM."""
    command = lambda out: train_args(out, "train.resume=auto", "train.num_workers=1", total=8)  # noqa: E731
    reference = run_cli(command(tmp_path / "reference"))  # train.resume=auto in an empty directory: a new run
    assert reference.returncode == 0, reference.stderr[-3000:]
    out, paused = tmp_path / "preempted", tmp_path / "paused"
    proc = start_paused(command(out), paused, step=2)  # the first regular checkpoint is at 4
    wait_paused(proc, paused)
    os.killpg(proc.pid, signal.SIGTERM)
    go(paused)
    assert proc.wait(timeout=300) == 143
    err = (paused / "stderr.txt").read_text()
    lines = [x for x in err.splitlines() if x.startswith("dinoseg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"stopped by SIGTERM at iteration 3 of 8, checkpoint written: {out / LAST}" in lines[0]
    assert "train.resume=auto" in lines[0]
    assert read_checkpoint(out / LAST)["iteration"] == 3  # the step it was in, finished
    resumed = run_cli(command(out))  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_head(read_checkpoint(tmp_path / "reference" / LAST), read_checkpoint(out / LAST), 8)


def test_resume_auto_refuses_files_of_a_run_without_a_checkpoint_and_contradicts_overwrite(run_copy, capsys):
    (run_copy / LAST).unlink()  # say, deleted by hand
    before = snapshot(run_copy)
    line = error_of(capsys, train_args(run_copy, "train.resume=auto"))
    assert "holds files of a run" in line and f"but no {LAST} to continue from" in line
    assert "contradict" in error_of(capsys, train_args(run_copy, "train.resume=auto", "overwrite_output_dir=true"))
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"just some text\n"])
def test_unreadable_files_in_every_checkpoint_role(tmp_path, capsys, finished_run, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    weights = [*HUB, f"model.pretrained_weights={bad}"]
    assert str(bad) in error_of(capsys, ["train", *tiny(tmp_path / "w"), *weights])
    assert str(bad) in error_of(capsys, ["eval", str(finished_run / "segmentation_config.yaml"), f"head={bad}",
                                         f"output_dir={tmp_path / 'e'}"])
    out = tmp_path / "r"
    out.mkdir()
    (out / LAST).write_bytes(content)
    assert str(out / LAST) in error_of(capsys, train_args(out, "train.resume=true"))


def test_python_objects_in_a_checkpoint_are_refused_without_an_unsafe_hint(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.nn.Linear(2, 2)}, evil)
    weights = [*HUB, f"model.pretrained_weights={evil}"]
    line = error_of(capsys, ["train", *tiny(tmp_path / "w"), *weights])
    assert "holds Python objects beyond tensors" in line and "refused" in line and "weights_only" not in line


def test_an_unreachable_url_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "http://127.0.0.1:9/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"  # nothing listens on port 9
    weights = [*HUB, f"model.pretrained_weights={url}"]
    assert f"{url}: download failed" in error_of(capsys, ["train", *tiny(tmp_path / "w"), *weights])


@pytest.mark.parametrize("yaml_text, message", [("- a\n- b\n", "the top level must be a mapping of keys, found a list"),
                                                ("just a string\n", "the top level must be a mapping")])
def test_a_yaml_that_is_not_a_mapping(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert f"{path}: {message}" in error_of(capsys, ["train", str(path)])


@pytest.mark.parametrize("override", [
    "train.log_interval=0", "eval.crop_batch_size=0", "decoder_head.num_classes=-1", "decoder_head.num_classes=0",
    "optimizer.lr=-1", "transforms.std=[0,0,0]", "eval.max_val_samples=0", "transforms.eval.tta_ratios=[]",
    "transforms.eval.img_size=0", "device=gpu0", "train.num_workers=-1", "optimizer.beta1=1.5", "seed=-1",
    "transforms.train.flip_prob=2", "train.celoss_weight=0", "scheduler.warmup_ratio=3",
])
def test_bad_values_are_refused_when_the_config_loads(tmp_path, capsys, override):
    out = tmp_path / "never"
    key = override.split("=")[0]
    assert f"{key}=" in error_of(capsys, ["train", *tiny(out), override])
    assert not out.exists()


def test_a_full_disk_during_a_checkpoint_save_then_an_exact_resume(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert main(train_args(reference, total=12)) == 0
    out = tmp_path / "full"
    real_save, calls = torch.save, {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fill_the_disk)
    line = error_of(capsys, train_args(out, total=12))
    assert f"{out / LAST}: checkpoint of iteration 8 not written (No space left on device)" in line
    assert "the previous checkpoint is intact" in line
    assert read_checkpoint(out / LAST)["iteration"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert main(train_args(out, "train.resume=true", total=12)) == 0
    a, b = read_checkpoint(reference / LAST), read_checkpoint(out / LAST)
    assert a["iteration"] == b["iteration"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_checkpoints_are_fsynced_before_they_are_relied_on(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real(fd)))
    out = tmp_path / "sync"
    assert main(train_args(out, total=4)) == 0
    assert any(p.startswith(str(out / ".checkpoint_last.pth.")) for p in synced)  # the file, before its rename
    assert str(out) in synced  # and its directory, after it


def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tmp_path):
    out, paused = tmp_path / "interrupted", tmp_path / "paused"
    proc = start_paused(train_args(out, total=8), paused, step=5)  # after the checkpoint at 4
    wait_paused(proc, paused)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (paused / "stderr.txt").read_text()
    line = [x for x in err.splitlines() if x.startswith("dinoseg: error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "interrupted at iteration 5 of 8" in line[0] and str(out / LAST) in line[0] and "train.resume=true" in line[0]
    assert "(iteration 4)" in line[0] and read_checkpoint(out / LAST)["iteration"] == 4
    assert main(train_args(out, "train.resume=true", total=6)) == 0


def test_a_bad_image_in_a_loader_worker_reads_as_in_the_main_process(tmp_path, capsys):
    root = tmp_path / "folder"
    make_folder(root, stems=("a", "b", "c", "d"), size=(32, 32))
    (root / "images" / "c.png").write_bytes(b"not a png")
    data = [f"datasets.train=Folder:root={root}", f"datasets.val=Folder:root={root}", "decoder_head.num_classes=3"]
    lines = {workers: error_of(capsys, ["train", *tiny(tmp_path / f"r{workers}", total_iter=4), *data,
                                        f"train.num_workers={workers}"]) for workers in (0, 2)}
    assert lines[0].startswith(f"dinoseg: error: {root / 'images' / 'c.png'}: unreadable or corrupt image: ")
    assert lines[2] == lines[0]  # no worker traceback, no class path: the same line


def test_predict_keeps_one_result_per_input_and_never_reads_its_outputs(finished_run, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / folder / "x.png")
    config, head = str(finished_run / "segmentation_config.yaml"), f"head={finished_run / LAST}"
    out = tmp_path / "out"
    assert main(["predict", config, head, "-i", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                 "-o", str(out)]) == 0
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {
        f"{d}/x_{s}.png" for d in "ab" for s in ("mask", "overlay", "label")}
    # -o equal to -i, twice: the second run segments the same 2 images, not its own outputs.
    same = tmp_path / "a"
    assert main(["predict", config, head, "-i", str(same), "-o", str(same)]) == 0
    assert main(["predict", config, head, "-i", str(same), "-o", str(same)]) == 0
    assert "wrote 3 files for 1 images" in capsys.readouterr().out.splitlines()[-1]
    assert sorted(p.name for p in same.glob("*.png")) == ["x.png", "x_label.png", "x_mask.png", "x_overlay.png"]


def test_predict_skips_an_unreadable_image_and_names_it(finished_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (20, 50), (200, 10, 10)).save(images / "zzz.png")
    out = tmp_path / "out"
    line = error_of(capsys, ["predict", str(finished_run / "segmentation_config.yaml"), f"head={finished_run / LAST}",
                             "-i", str(images), "-o", str(out)])
    assert "1 of 3 images could not be read" in line and str(images / "broken.jpg") in line
    assert (out / "good_mask.png").exists() and (out / "zzz_mask.png").exists()


def test_cityscapes_label_ids_outside_the_table(tmp_path):
    make_cityscapes(tmp_path)
    mask = next((tmp_path / "gtFine" / "val").rglob("*_labelIds.png"))
    ids = np.array(Image.open(mask))
    ids[0, :3] = [200, 7, 34]
    Image.fromarray(ids).save(mask)
    dataset = make_dataset(f"Cityscapes:split=val:root={tmp_path}")
    bad = next(i for i in range(len(dataset)) if dataset.mask_path(i) == str(mask))
    with pytest.raises(DatasetError, match=r"labelIds.png: out-of-range label values \[34, 200\]"):
        dataset[bad]
    report = check_dataset(make_dataset(f"Cityscapes:split=val:root={tmp_path}", strict=False))
    assert [p.path for p in report.problems] == [str(mask)]
    assert "out-of-range label values [34, 200]" in report.problems[0].fault


def test_eval_dir_and_demo_sample_images(tmp_path):
    from dinoseg.engine.predict import save_sample_images
    from dinoseg.engine.rundir import eval_dir

    assert eval_dir(tmp_path / "run", tmp_path / "run" / "checkpoint_best.pth") == tmp_path / "run" / "eval" / "checkpoint_best"

    class Images:
        def __len__(self):
            return 2

        def load_image(self, i):
            return torch.full((3, 5, 7), 40 * i, dtype=torch.uint8)

    out = save_sample_images(Images(), tmp_path / "demo_inputs")
    assert sorted(p.name for p in out.iterdir()) == ["sample_0.png", "sample_1.png"]
    assert np.asarray(Image.open(out / "sample_1.png")).shape == (5, 7, 3)
    assert (np.asarray(Image.open(out / "sample_1.png")) == 40).all()
