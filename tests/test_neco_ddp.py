"""Two CPU processes (gloo), launched the way torchrun launches them, train like one process on the
same global batch: same losses, same weight updates."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data: Path, out: Path, batch: int) -> list[str]:
    return ["--model", "random:vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2}', "--data", str(data),
            "--output", str(out), "--batch-size", str(batch), "--global-size", "32", "--local-size", "16",
            "--head-hidden", "64", "--head-out", "32", "--workers", "0", "--queue-length", "64", "--epochs", "1",
            "--drop-path", "0", "--log-every", "1", "--no-progress", "--device", "cpu"]


def _launch(args: list[str], world: int) -> None:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "neco_train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=480)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (72, 88, 3), dtype=np.uint8)).save(data / f"{i}.png")
    _launch(_args(data, tmp_path / "single", 4), world=1)
    _launch(_args(data, tmp_path / "ddp", 2), world=2)

    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("single", "ddp")}
    assert [r["step"] for r in logs["single"]] == [r["step"] for r in logs["ddp"]] == [1, 2]
    for a, b in zip(logs["single"], logs["ddp"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)   # rank-averaged loss of the same global batch
    meta = json.loads((tmp_path / "ddp" / "last.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2

    from densebench.encoders import load_encoder
    base = load_encoder("random:vit_tiny_patch16_224", model_kwargs={"depth": 2}).model.state_dict()
    single = load_file(str(tmp_path / "single" / "last.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "last.safetensors"))
    assert set(single) == set(ddp) == set(base)
    update_single = torch.cat([(single[k] - base[k]).flatten() for k in base])
    update_ddp = torch.cat([(ddp[k] - base[k]).flatten() for k in base])
    assert update_single.norm() > 0
    assert (update_ddp - update_single).norm() / update_single.norm() < 2e-3
