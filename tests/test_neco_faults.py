"""neco_train under faults and on clusters: an existing run folder, other data on resume, an --output that
is a file, a full disk, Ctrl-C, bad numbers, the log after a resume, the distributed backend and SLURM,
concurrent weight downloads, torch.compile recompiles, throughput in the log."""

import errno
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_neco_train import image_folder, tiny_config

from densebench.errors import ConfigError
from neco_train import distributed
from neco_train.cli import main as cli_main
from neco_train.data import collate
from neco_train.trainer import NecoObjective, Trainer, TrainingError


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "random:vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2}', "--data", str(data),
            "--output", str(out), "--batch-size", "2", "--global-size", "32", "--local-size", "16",
            "--head-hidden", "64", "--head-out", "32", "--workers", "0", "--queue-length", "64", "--epochs", "2",
            "--no-progress", *extra]


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return exc.value.code


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


# -- issue 13 ---------------------------------------------------------------------------------------------


def test_existing_run_folder_is_refused_untouched_unless_resume_or_overwrite(images, tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(cli_args(images, out, "--max-steps", "2", "--save-every", "1"))
    capsys.readouterr()
    before = snapshot(out)
    assert exit_code(cli_args(images, out, "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    assert f"--output {out} already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert "Traceback" not in err and snapshot(out) == before
    # continuing another run into this folder would mix the two as well
    other = tmp_path / "other"
    cli_main(cli_args(images, other, "--max-steps", "1"))
    capsys.readouterr()
    assert exit_code(cli_args(images, out, "--max-steps", "2", "--resume", str(other))) == 2
    assert "already holds another run" in capsys.readouterr().err and snapshot(out) == before
    # --overwrite replaces the run: no checkpoint or log line of the old one survives
    cli_main(cli_args(images, out, "--max-steps", "1", "--overwrite"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001.json", "step-0000001.safetensors"]
    assert json.loads((out / "last.json").read_text())["step"] == 1 and log_steps(out) == [1]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 1


def test_resume_refuses_other_images_of_the_same_count(images, tmp_path):
    first = Trainer(tiny_config(images, tmp_path / "run", max_steps=1))
    first.fit()
    other = image_folder(tmp_path / "other", n=6, size=(64, 72), seed=1)  # same names and count, other images
    with pytest.raises(ConfigError, match=rf"trained on other images: 6 files under {images}.*now 6 files under "
                                          rf"{other}"):
        Trainer(tiny_config(other, tmp_path / "run", max_steps=2, resume=str(tmp_path / "run")), base=first.base)
    # the same files moved to another folder are the same data
    import shutil
    moved = Path(shutil.copytree(images, tmp_path / "moved"))
    resumed = Trainer(tiny_config(moved, tmp_path / "run", max_steps=2, resume=str(tmp_path / "run")),
                      base=first.base)
    assert resumed.step == 1


def test_output_that_is_a_file_is_a_clean_error(images, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    for out in (target, target / "run"):
        assert exit_code(cli_args(images, out)) == 2
        err = capsys.readouterr().err
        assert f"{target} is a file" in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


def test_full_disk_stops_with_one_message_and_keeps_the_previous_checkpoint(images, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_full_at_step_2(tensors, filename, metadata=None):
        if ".step-0000002." in Path(filename).name:
            Path(filename).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_2)
    out = tmp_path / "run"
    code = exit_code(cli_args(images, out, "--max-steps", "3", "--save-every", "1"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: could not write the checkpoint of step 2 in {out} at step 2: {os.strerror(errno.ENOSPC)}; "
        f"the last complete checkpoint is kept at {out / 'checkpoints' / 'step-0000001.safetensors'}"]
    assert f"--resume {out / 'train_state.pt'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001.json", "step-0000001.safetensors"]
    assert json.loads((out / "last.json").read_text())["step"] == 1
    assert (out / "last.safetensors").read_bytes() == (out / "checkpoints" / "step-0000001.safetensors").read_bytes()
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 1
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_ctrl_c_exits_130_with_the_command_that_resumes(images, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = cli_args(images, out, "--epochs", "100", "--save-every", "1", "--log-every", "1", "--device", "cpu")
    proc = subprocess.Popen([sys.executable, "-m", "neco_train", *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((out / "log.jsonl").exists() and len(log_steps(out)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    assert line == err.strip().splitlines()[-1] and line.startswith("neco_train: interrupted at step ")
    stopped = int(line.split("interrupted at step ")[1].split(";")[0])
    command = shlex.split(line.split("resume with: ")[1])
    assert command == ["neco_train", *args, "--resume", str(out)]
    # the printed command continues the run; each step is logged once
    resumed = subprocess.run([sys.executable, "-m", *command, "--max-steps", str(stopped + 1)], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert log_steps(out) == list(range(1, stopped + 2))


@pytest.mark.parametrize("flag, value, rule", [
    ("--lr-backbone", "-1e-05", "> 0"), ("--lr-head", "0", "> 0"), ("--lr-head", "nan", "> 0"),
    ("--weight-decay", "-0.04", ">= 0"), ("--weight-decay-end", "-0.5", ">= 0"), ("--max-steps", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"), ("--batch-size", "-4", ">= 1"), ("--epochs", "0", ">= 1"),
    ("--workers", "-1", ">= 0"), ("--save-every", "-1", ">= 0")])
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value, rule):
    argv = cli_args(tmp_path / "no-data", tmp_path / "out", f"{flag}={value}")  # '-1e-05' alone reads as a flag
    argv[1] = "not_a_model"  # neither the model nor the data is looked at before the values are checked
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    number = int(value) if value.lstrip("-").isdigit() else float(value)
    assert f"{flag} must be {rule}; got {number}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_logs_each_step_once(images, tmp_path, monkeypatch):
    cfg = {"max_steps": 5, "log_every": 1}  # 3 steps per epoch: a checkpoint at step 3
    trainer = Trainer(tiny_config(images, tmp_path, **cfg))
    real, calls = NecoObjective.loss, {"n": 0}

    def nan_at_step_5(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(NecoObjective, "loss", nan_at_step_5)
    with pytest.raises(TrainingError, match="non-finite at step 5"):
        trainer.fit()
    monkeypatch.setattr(NecoObjective, "loss", real)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line a crash cut short
    assert log_steps_raw(tmp_path) == [1, 2, 3, 4]  # step 4 ran after the last checkpoint (step 3)
    resumed = Trainer(tiny_config(images, tmp_path, **cfg, resume=str(tmp_path)), base=trainer.base)
    assert resumed.step == 3
    resumed.fit()
    assert log_steps(tmp_path) == [1, 2, 3, 4, 5]
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["images_per_s"] > 0 and 0 <= record["data_wait_share"] <= 1  # throughput in the log


def log_steps_raw(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if line.endswith("}")]


# -- issue 15: clusters -----------------------------------------------------------------------------------


def test_auto_device_selects_nccl_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [distributed.select_backend(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == ["nccl", "nccl", "nccl",
                                                                                          "gloo"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.select_backend("auto") == "gloo"


def test_rank_mean_reduces_on_the_training_device(monkeypatch, images, tmp_path):
    seen = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: seen.append(t.device))
    ctx = distributed.DistContext(rank=0, world_size=2, device=torch.device("meta"))
    ctx.mean(torch.tensor(1.0))  # a CPU tensor, as the loss average of a log window is built
    assert seen == [torch.device("meta")]
    trainer = Trainer(tiny_config(images, tmp_path, device="cpu"), dry_run=True)
    assert trainer.dist.device == trainer.device


def test_srun_without_torchrun_reads_slurm_variables(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what init_distributed sets is undone afterwards
        monkeypatch.delenv(key)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[007-008,011],cpu01"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kw: calls.append({**kw, "addr": os.environ["MASTER_ADDR"],
                                                   "port": os.environ["MASTER_PORT"]}))
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    assert calls == [{"backend": "gloo", "rank": 5, "world_size": 8, "addr": "gpu007", "port": str(20000 + 3456)}]
    # torchrun's variables win, and a single-task step is a single process
    assert distributed.slurm_environment({**slurm, "WORLD_SIZE": "2"}) is None
    assert distributed.slurm_environment({**slurm, "SLURM_NTASKS": "1"}) is None
    explicit = distributed.slurm_environment({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})
    assert (explicit["MASTER_ADDR"], explicit["MASTER_PORT"]) == ("head", "29500")
    assert distributed.first_slurm_host("node17") == "node17"
    monkeypatch.undo()
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] != "8"


def test_concurrent_loads_download_the_weights_once(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    from safetensors.torch import save_file

    from densebench.encoders import weights as weights_module
    from densebench.encoders.timm_encoder import create_timm_vit
    from neco_train.model import load_base

    monkeypatch.delenv("DENSEBENCH_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(weights_module, "reachable", lambda url, timeout=3.0: None)   # a network, simulated
    weights = {k: v.contiguous() for k, v in create_timm_vit("vit_tiny_patch16_224", {"depth": 2}).state_dict().items()}
    downloads = []

    def fake_download(repo, filename, **kwargs):  # slow enough for a second loader to come looking meanwhile
        downloads.append(repo)
        time.sleep(1.0)
        dest = tmp_path / "hub" / "checkpoints" / f"{repo.replace('/', '--')}.safetensors"
        save_file(weights, str(dest))
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    load = functools.partial(load_base, "timm:vit_tiny_patch16_224", model_kwargs={"depth": 2})
    results = []
    threads = [threading.Thread(target=lambda: results.append(load())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and len(downloads) == 1
    assert results[0].fingerprint == results[1].fingerprint


def test_compile_does_not_recompile_every_step(images, tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # dynamo without a code generator: counts the frames it compiles
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    trainer = Trainer(tiny_config(images, tmp_path, compile=True, drop_path=0.0))
    batch = collate([trainer.dataset[(0, i)] for i in range(2)])
    frames = []
    for _ in range(4):
        trainer.train_step(batch)
        frames.append(counter.frame_count)
    assert frames[1] == frames[-1] <= 2, frames
    torch._dynamo.reset()


def test_checkpoints_honour_the_umask_like_results(tmp_path):
    import stat

    from neco_train.checkpoint import _atomic_write

    old = os.umask(0o022)
    try:
        target = tmp_path / "ckpt.safetensors"
        _atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"x"))
        assert stat.S_IMODE(target.stat().st_mode) == 0o644          # mkstemp alone would give 0600
        os.chmod(target, 0o664)
        _atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"y"))
        assert stat.S_IMODE(target.stat().st_mode) == 0o664          # a rewritten file keeps its mode
    finally:
        os.umask(old)
