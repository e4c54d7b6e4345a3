"""The NeCo trainer on tiny random ViTs and tiny crops: schedules, EMA, parameter groups, queue,
a short run that lowers the loss, checkpoints densebench loads, exact resume, and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densebench.errors import ConfigError, DataError, ModelError
from neco_train.cli import main as cli_main
from neco_train.cli import run_cli
from neco_train.data import collate
from neco_train.model import cosine_schedule, ema_update, load_base
from neco_train.trainer import NecoObjective, ReferenceQueue, StepInputs, TrainConfig, Trainer, TrainingError

TINY = {"model": "random:vit_tiny_patch16_224", "model_kwargs": {"depth": 2}, "batch_size": 2, "global_size": 32,
        "local_size": 16, "head_hidden": 64, "head_out": 32, "workers": 0, "progress": False, "queue_length": 64,
        "epochs": 2}


def image_folder(root: Path, n: int = 6, size=(80, 96), seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def tiny_config(data, out, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(data), "output": str(out), **overrides})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trainer(images, tmp_path_factory):
    return Trainer(tiny_config(images, tmp_path_factory.mktemp("run"), drop_path=0.1))


def test_cosine_schedules_at_known_steps(trainer):
    assert cosine_schedule(1e-5, 0.0, 0, 100) == 1e-5
    assert math.isclose(cosine_schedule(1e-5, 0.0, 50, 100), 5e-6, rel_tol=1e-12)
    assert cosine_schedule(1e-5, 0.0, 100, 100) == 0.0
    assert math.isclose(cosine_schedule(0.04, 0.5, 25, 100), 0.5 + 0.5 * (0.04 - 0.5) * (1 + math.cos(math.pi / 4)))
    assert math.isclose(cosine_schedule(1.0, 0.0, 5, 100, warmup=10), 0.5)  # linear warm-up from 0
    total = trainer.total_steps  # 6 images / batch 2 = 3 steps per epoch, 2 epochs
    assert total == 6
    mid = trainer.schedule(3)
    assert math.isclose(mid["lr_backbone"], 0.5e-5) and math.isclose(mid["lr_head"], 0.5e-4)
    assert math.isclose(mid["weight_decay"], 0.27) and math.isclose(mid["momentum"], 0.99975)
    end = trainer.schedule(total)
    assert end["lr_backbone"] == 0.0 and math.isclose(end["weight_decay"], 0.5) and end["momentum"] == 1.0
    trainer._apply_schedule(mid)
    by_name = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert by_name["backbone_decay"]["lr"] == by_name["backbone_no_decay"]["lr"] == mid["lr_backbone"]
    assert by_name["head_decay"]["lr"] == by_name["head_no_decay"]["lr"] == mid["lr_head"]
    assert by_name["backbone_decay"]["weight_decay"] == by_name["head_decay"]["weight_decay"] == mid["weight_decay"]
    assert by_name["backbone_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"] == 0.0


def test_parameter_groups_follow_the_reference(trainer):
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups}
    assert all(n.startswith("head.") for n in groups["head_decay"] + groups["head_no_decay"])
    assert not any(n.startswith("head.") for n in groups["backbone_decay"] + groups["backbone_no_decay"])
    assert any(n.endswith("cls_token") for n in groups["backbone_decay"])   # tokens decay (ndim > 1)
    assert any(n.endswith("pos_embed") for n in groups["backbone_decay"])
    assert all(n.endswith(".bias") or "norm" in n or "ls" in n for n in groups["backbone_no_decay"])
    assert all(n.endswith(".bias") for n in groups["head_no_decay"])
    assert sum(len(v) for v in groups.values()) == len(names)


def test_teacher_starts_as_the_student_and_has_no_gradients(trainer, images, tmp_path):
    # default = the reference: same backbone, independently drawn projection heads
    s, t = trainer.student.state_dict(), trainer.teacher.state_dict()
    assert set(s) == set(t)
    for k in s:
        if not k.startswith("head."):
            torch.testing.assert_close(s[k], t[k], rtol=0, atol=0)
    assert not torch.equal(s["head.mlp.0.weight"], t["head.mlp.0.weight"])
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    copied = Trainer(tiny_config(images, tmp_path, teacher_head="copy"), base=trainer.base)
    cs, ct = copied.student.state_dict(), copied.teacher.state_dict()
    for k in cs:
        torch.testing.assert_close(cs[k], ct[k], rtol=0, atol=0)  # backbone and (copied) head
    torch.testing.assert_close(cs["head.mlp.0.weight"], s["head.mlp.0.weight"], rtol=0, atol=0)  # same student


def test_ema_update_is_the_momentum_average():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    expected = [0.9 * tp.detach().clone() + 0.1 * sp.detach()
                for tp, sp in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-14, atol=1e-14)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)  # the end of the schedule freezes the teacher
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, teacher.parameters()))


def test_queue_is_a_fifo_and_samples_filled_rows():
    q = ReferenceQueue(2, 5, 1, torch.device("cpu"))
    q.push(0, torch.tensor([[1.0], [2.0]]))
    q.push(0, torch.tensor([[3.0], [4.0], [5.0]]))
    assert q.data[0, :, 0].tolist() == [3.0, 4.0, 5.0, 1.0, 2.0] and q.entries == [5, 0]
    q.push(0, torch.tensor([[6.0]]))
    assert q.data[0, :, 0].tolist() == [6.0, 3.0, 4.0, 5.0, 1.0]
    q2 = ReferenceQueue(1, 100, 1, torch.device("cpu"))
    q2.push(0, torch.arange(10.0).unsqueeze(1))
    gen = torch.Generator().manual_seed(0)
    idx = q2.sample_indices(0, 8, gen, legacy=False)
    assert len(set(idx.tolist())) == 8 and int(idx.max()) < 10          # distinct filled rows
    many = q2.sample_indices(0, 50, gen, legacy=False)
    assert int(many.max()) < 10 and len(many) == 50
    legacy = q2.sample_indices(0, 50, gen, legacy=True)                  # randperm(100)[:50] % 10
    assert int(legacy.max()) < 10 and len(set(legacy.tolist())) <= 10


def test_objective_matches_the_literal_reference_step(trainer):
    """Same batch, same references: the batched objective equals the per-pair loop with dense diffsort."""
    pytest.importorskip("diffsort")
    import importlib.util
    spec = importlib.util.spec_from_file_location("neco_step", Path(__file__).parents[1] / "bench" / "neco_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batch = collate([trainer.dataset[(0, i)] for i in range(2)])
    inputs = StepInputs.from_batch(batch, trainer.device)
    trainer.student.eval()  # no drop-path: both sides must see the same network
    try:
        ours, reference = bench.compare_losses(trainer, inputs)
    finally:
        trainer.student.train()
    assert math.isclose(ours, reference, rel_tol=1e-5)


def test_short_run_on_the_synthetic_suite_lowers_the_loss(synth_root, tmp_path):
    cfg = tiny_config(synth_root / "coco", tmp_path, batch_size=4, global_size=64, local_size=32, head_hidden=128,
                      head_out=64, references="batch", drop_path=0.0, lr_backbone=1e-3, lr_head=1e-3,
                      momentum=0.99, momentum_end=0.99, epochs=3, max_steps=10)
    trainer = Trainer(cfg)
    inputs = StepInputs.from_batch(collate([trainer.dataset[(0, i)] for i in range(4)]), trainer.device)

    def fixed_batch_loss():  # same batch, same reference draw
        objective = NecoObjective(cfg, patch_size=16, dim=64, device=trainer.device, dist=trainer.dist)
        with torch.no_grad():
            return float(objective.loss(trainer.student, trainer.teacher, inputs, autocast=False))

    before = fixed_batch_loss()
    summary = trainer.fit()
    after = fixed_batch_loss()
    assert summary["steps"] == 10 and all(math.isfinite(v) for v in summary["losses"])
    assert after < before - 0.1, (before, after)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10 and {"loss", "lr_backbone", "lr_head", "momentum", "images_per_s"} <= set(log[-1])


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    trainer = Trainer(tiny_config(images, out, drop_path=0.1, lr_backbone=1e-3, lr_head=1e-3, max_steps=3))
    trainer.fit()
    return trainer


def test_checkpoint_loaded_by_densebench_gives_the_students_features(finished_run):
    from densebench.encoders import load_encoder

    out = finished_run.out
    meta = json.loads((out / "last.json").read_text())
    assert meta["format"] == "densebench-neco-1" and meta["arch"] == "vit_tiny_patch16_224"
    assert meta["model_kwargs"]["depth"] == 2 and meta["step"] == 3
    assert meta["base_model"] == "random:vit_tiny_patch16_224" and meta["base_fingerprint"]
    assert meta["config"]["lr_head"] == 1e-3
    assert (out / "checkpoints" / "step-0000003.safetensors").is_file()
    student = finished_run.student.backbone.eval()
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(images)
    loaded = load_encoder("neco:" + str(out / "last"), pos_interp=meta["pos_interp"])
    by_weights = load_encoder("timm:vit_tiny_patch16_224", weights=str(out / "last.safetensors"),
                              model_kwargs=meta["model_kwargs"], pos_interp=meta["pos_interp"])
    with torch.no_grad():
        for enc in (loaded, by_weights):
            torch.testing.assert_close(enc(images), expected, rtol=1e-5, atol=1e-5)
    assert loaded.fingerprint != finished_run.base.fingerprint
    # a checkpoint is also a base model to continue from (its sidecar supplies the architecture kwargs)
    again = load_base("neco:" + str(out / "last"))
    assert again.arch == "vit_tiny_patch16_224" and again.model_kwargs["depth"] == 2
    for k, v in finished_run.student.timm_model.state_dict().items():
        torch.testing.assert_close(again.state_dict[k], v, rtol=0, atol=0)


def test_resume_continues_exactly_where_the_run_stopped(images, tmp_path):
    overrides = {"drop_path": 0.1, "lr_backbone": 1e-3, "lr_head": 1e-3, "max_steps": 4, "save_every": 2}
    straight = Trainer(tiny_config(images, tmp_path / "straight", **overrides))
    straight_losses = straight.fit()["losses"]
    first = Trainer(tiny_config(images, tmp_path / "split", **{**overrides, "max_steps": 2}), base=straight.base)
    first_losses = first.fit()["losses"]
    resumed = Trainer(tiny_config(images, tmp_path / "split", **overrides, resume=str(tmp_path / "split")),
                      base=straight.base)
    assert resumed.step == 2
    resumed_losses = resumed.fit()["losses"]
    assert first_losses + resumed_losses == pytest.approx(straight_losses, rel=1e-6)
    for (k, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    for a, b in zip(straight.objective.queue.data, resumed.objective.queue.data):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_from_another_configuration_is_refused(finished_run, images, tmp_path):
    cfg = tiny_config(images, tmp_path, drop_path=0.1, lr_backbone=2e-3, lr_head=1e-3, max_steps=3,
                      resume=str(finished_run.out / "train_state.pt"))
    with pytest.raises(ConfigError, match="lr_backbone: checkpoint 0.001 vs now 0.002"):
        Trainer(cfg, base=finished_run.base)
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(tiny_config(images, tmp_path, resume=str(tmp_path / "nothing")), base=finished_run.base)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(images, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(images, tmp_path, save_every=1, max_steps=6))
    real = NecoObjective.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(NecoObjective, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite at step 3.*step-0000002\.safetensors"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "step-0000002.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "step-0000003.safetensors").exists()
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 2
    assert torch.isfinite(torch.cat([p.flatten() for p in trainer.student.parameters()])).all()
    with torch.no_grad():  # diverged weights are never written over the last good checkpoint
        next(trainer.student.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="parameters became non-finite"):
        trainer.save()
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 2


def test_bad_input(images, tmp_path, finished_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        Trainer(tiny_config(empty, tmp_path / "o1"), base=finished_run.base)
    with pytest.raises(DataError, match="does not exist"):
        Trainer(tiny_config(tmp_path / "missing", tmp_path / "o2"), base=finished_run.base)
    with pytest.raises(DataError, match="fewer than one global batch"):
        Trainer(tiny_config(images, tmp_path / "o3", batch_size=7), base=finished_run.base)
    with pytest.raises(ModelError, match="unknown model 'not_a_model'"):
        Trainer(tiny_config(images, tmp_path / "o4", model="not_a_model"))
    with pytest.raises(ConfigError, match="'sideways'"):
        Trainer(tiny_config(images, tmp_path / "o5", references="sideways"), base=finished_run.base)
    with pytest.raises(ConfigError, match="not a multiple of the patch size 16"):
        Trainer(tiny_config(images, tmp_path / "o6", global_size=40), base=finished_run.base)
    # images whose crops cannot overlap enough: a DataError naming the image, raised by fit
    small = Trainer(tiny_config(images, tmp_path / "o7", min_intersection=0.9), base=finished_run.base)
    with pytest.raises(DataError, match=r"img\d\d\.png \(96x80 px\) is too small"):
        small.fit()


def test_corrupt_images_are_skipped_and_counted(tmp_path, finished_run):
    folder = image_folder(tmp_path / "imgs", n=4)
    (folder / "img01.png").write_bytes(b"this is not a png")
    trainer = Trainer(tiny_config(folder, tmp_path / "out", epochs=1), base=finished_run.base)
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["skipped_images"] >= 1


def test_cli_dry_run_and_user_errors(images, tmp_path, capsys):
    args = ["--model", "random:vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2}', "--data", str(images),
            "--output", str(tmp_path / "cli"), "--batch-size", "2", "--global-size", "32", "--local-size", "16",
            "--head-hidden", "64", "--head-out", "32", "--workers", "0", "--queue-length", "64"]
    summary = run_cli(args + ["--dry-run", "1"])["dry_run"]
    assert summary["steps_per_epoch"] == 3 and summary["seconds_per_step"] > 0
    assert math.isclose(summary["seconds_per_epoch"], 3 * summary["seconds_per_step"])
    assert "projected" in capsys.readouterr().out
    assert not (tmp_path / "cli" / "train_state.pt").exists()   # a dry run writes nothing
    with pytest.raises(SystemExit) as exc:
        cli_main(args[:4] + ["--data", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(args + ["--bench", "no-such-benchmark", "--bench-data-root", str(tmp_path)])
    assert exc.value.code == 2 and "no-such-benchmark" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_densebench_before_and_after(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", "random:vit_tiny_patch16_224", "--model-kwargs", '{"depth": 2}', "--data",
            str(synth_root / "coco"), "--output", str(out), "--batch-size", "4", "--global-size", "32",
            "--local-size", "16", "--head-hidden", "64", "--head-out", "32", "--workers", "0", "--epochs", "1",
            "--max-steps", "2", "--no-progress", "--bench", "voc-incontext,coco-things-linear",
            "--bench-data-root", str(synth_root), "--bench-option", "input_size=64"]
    rows = run_cli(args)["bench"]
    assert [r["benchmark"] for r in rows] == ["voc-incontext", "coco-things-linear"]
    table = capsys.readouterr().out
    assert "before/after" in table and "voc-incontext" in table
    sidecar = json.loads((out / "last.json").read_text())
    for r in rows:
        base = json.loads(Path(r["base_result"]).read_text())
        trained = json.loads(Path(r["trained_result"]).read_text())
        assert base["model"]["fingerprint"] == sidecar["base_fingerprint"]
        assert trained["model"]["fingerprint"] != base["model"]["fingerprint"]
        assert trained["model"]["neco_step"] == 2
        assert r["base"] == base["metrics"][r["metric"]] and r["trained"] == trained["metrics"][r["metric"]]
        assert 0 <= r["base"] <= 100 and r["delta"] == pytest.approx(r["trained"] - r["base"])
    assert json.loads((out / "bench" / "before_after.json").read_text())["rows"] == rows


def test_image_layouts_are_recognised(tmp_path):
    from neco_train.data import find_images, resolve_image_root

    coco = image_folder(tmp_path / "coco" / "images" / "train2017", n=2)
    image_folder(tmp_path / "coco" / "images" / "val2017", n=3)
    assert resolve_image_root(tmp_path / "coco") == (coco, "coco")
    inet = tmp_path / "inet"
    for cls in ("n01", "n02"):
        image_folder(inet / "train" / cls, n=2)
    image_folder(inet / "val" / "n01", n=5)
    files, layout = find_images(inet)
    assert layout == "imagenet" and len(files) == 4 and all("train" in f.parts for f in files)
    plain = image_folder(tmp_path / "plain" / "a" / "b", n=3)
    (plain / "notes.txt").write_text("not an image")
    files, layout = find_images(tmp_path / "plain")
    assert layout == "folder" and len(files) == 3


def test_global_batches_are_split_across_processes_without_changing_them():
    from neco_train.data import GlobalBatchSampler

    one = list(GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3, epoch=1))
    two = [list(GlobalBatchSampler(23, 4, rank=r, world_size=2, seed=3, epoch=1)) for r in range(2)]
    assert len(one) == 20  # drop_last: 5 steps of 4
    for step in range(5):
        assert one[4 * step:4 * step + 4] == two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2]
    assert sorted(i for _, i in one) == sorted({i for _, i in one})  # no repeats within an epoch
    assert list(GlobalBatchSampler(23, 4, 0, 1, seed=3, epoch=1, start_step=2)) == one[8:]
    assert list(GlobalBatchSampler(23, 4, 0, 1, seed=3, epoch=2)) != one
