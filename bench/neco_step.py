"""One NeCo training step on CPU: densebench's trainer vs a literal reimplementation of the reference step.

The reference step (vpariza/NeCo ``neco.py``, spec neco.md §1-§2) is written out from its described
behaviour: the teacher runs with autograd on and ``requires_grad=True`` parameters, the queue is updated
from a pooled ``randperm`` and sampled with ``randperm(length)[:B·49] % entries``, every (g, v) pair is a
separate iteration of a Python loop with its own ROI-Align calls and two dense ``diffsort.DiffSortNet``
calls, ``log P`` has no floor, the EMA is a Python loop over parameters and runs before the optimizer
step. densebench's step is ``Trainer.train_step``: teacher under ``no_grad``, one batched ROI-Align per
side, one ``soft_sort`` call for all pairs, fused foreach EMA after the step.

Reported from one run, same model, same batch, same initial weights:
  - loss equality: both losses on the same batch with the same (fixed) reference patches (target |Δ|/loss < 1e-5),
  - time per full step (forward, loss, backward, AdamW, EMA) and images/s; target >= 2x throughput,
  - where the reference's time goes (sorting vs the rest), to show what the ratio depends on.
Writes bench/results/neco_step.json. Not part of the test suite (no timing assertions anywhere).

    OMP_NUM_THREADS=1 python bench/neco_step.py [--model random:vit_small_patch16_224] [--batch 8]
                                                [--global-size 112] [--local-size 48] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ReferenceStep:
    """The reference training step, literally (per-pair loop, dense diffsort, teacher with gradients)."""

    def __init__(self, student, teacher, optimizer, cfg, patch_size: int, device):
        from diffsort import DiffSortNet

        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.cfg, self.patch, self.device = cfg, patch_size, device
        for p in self.teacher.parameters():  # the reference never turns the teacher's gradients off
            p.requires_grad_(True)
        n = cfg.roi_size ** 2
        self.sort_student = DiffSortNet(cfg.network, n, device=str(device), steepness=cfg.student_steepness)
        self.sort_teacher = DiffSortNet(cfg.network, n, device=str(device), steepness=cfg.teacher_steepness)
        self.queue = torch.zeros(2, cfg.queue_length, cfg.head_out, device=device)
        self.entries = [0, 0]
        self.sort_seconds = 0.0

    def _update_queue(self, crop: int, full: torch.Tensor) -> None:
        with torch.no_grad():
            flat = full.reshape(-1, full.shape[-1])
            batch = full.shape[0]
            k = min(10 * batch, self.queue.shape[1])
            rows = flat[torch.randperm(flat.shape[0])[:k]]
            self.queue[crop, k:] = self.queue[crop, :-k].clone()
            self.queue[crop, :k] = rows
            self.entries[crop] = min(self.entries[crop] + k, self.queue.shape[1])

    def _sample(self, crop: int, batch: int) -> torch.Tensor:
        n = self.cfg.roi_size ** 2
        idx = torch.randperm(self.queue.shape[1])[:batch * n] % self.entries[crop]
        return self.queue[crop][idx].reshape(batch, n, -1)

    def loss(self, inputs, refs: dict | None = None) -> torch.Tensor:
        from torchvision.ops import roi_align

        k, p = self.cfg.roi_size, self.patch
        n_global, batch = inputs.global_crops.shape[:2]
        n_crops = n_global + inputs.local_crops.shape[0]
        (teacher_out,) = self.teacher(inputs.global_crops.flatten(0, 1))          # autograd on
        student_global, student_local = self.student(inputs.global_crops.flatten(0, 1),
                                                     inputs.local_crops.flatten(0, 1))
        as_grid = lambda z: z.permute(0, 3, 1, 2)
        teacher_maps = [teacher_out[g * batch:(g + 1) * batch] for g in range(n_global)]
        student_maps = ([student_global[c * batch:(c + 1) * batch] for c in range(n_global)]
                        + [student_local[c * batch:(c + 1) * batch] for c in range(n_crops - n_global)])
        if refs is None:
            for g in range(n_global):
                self._update_queue(g, teacher_maps[g].detach())
        total = 0.0
        for g in range(n_global):
            boxes = list((inputs.boxes_global[:, g] / p).unbind(0))           # B tensors of (V, 4)
            t_g = roi_align(as_grid(teacher_maps[g]), boxes, k, aligned=True)  # (B·V, D, k, k), image-major
            for v in range(n_crops):
                if v == g:
                    continue
                t_gv = t_g[v::n_crops]
                s_boxes = list((inputs.boxes_all[:, v, g].unsqueeze(1) / p).unbind(0))
                s_vg = roi_align(as_grid(student_maps[v]), s_boxes, k, aligned=True)
                ref = refs[(g, v)] if refs is not None else self._sample(g, batch)
                ref = F.normalize(ref, dim=-1)
                a_s = torch.bmm(F.normalize(s_vg.flatten(2).transpose(1, 2), dim=-1), ref.transpose(1, 2))
                a_t = torch.bmm(F.normalize(t_gv.flatten(2).transpose(1, 2), dim=-1), ref.transpose(1, 2))
                t0 = time.perf_counter()
                perm = self.sort_student(a_s.reshape(-1, k * k))[1]
                with torch.no_grad():
                    target = self.sort_teacher(a_t.reshape(-1, k * k))[1]
                self.sort_seconds += time.perf_counter() - t0
                total = total - (target * torch.log(perm)).sum() / (batch * (k * k) ** 2)
        return total / (n_global * (n_crops - 1))

    def step(self, inputs, momentum: float) -> float:
        loss = self.loss(inputs)
        with torch.no_grad():  # EMA inside training_step, i.e. before the optimizer step
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.data = t.data * momentum + s.data * (1 - momentum)
        self.optimizer.zero_grad()
        t0 = time.perf_counter()
        loss.backward()
        self.backward_seconds = time.perf_counter() - t0
        self.optimizer.step()
        return float(loss.detach())


def fixed_references(trainer, batch: int, seed: int = 0) -> torch.Tensor:
    """Deterministic reference patches (P·B, R, D) for loss comparisons."""
    from neco_train.trainer import pair_list

    pairs = pair_list(trainer.crops.n_crops)
    gen = torch.Generator().manual_seed(seed)
    r = trainer.cfg.roi_size ** 2
    return torch.randn(len(pairs) * batch, r, trainer.cfg.head_out, generator=gen).to(trainer.device)


def compare_losses(trainer, inputs) -> tuple[float, float]:
    """densebench's objective and the literal reference loss on one batch with the same references."""
    from neco_train.trainer import NecoObjective, pair_list

    batch = inputs.global_crops.shape[1]
    refs = fixed_references(trainer, batch)
    objective = NecoObjective(trainer.cfg, patch_size=trainer.base.patch_size, dim=trainer.cfg.head_out,
                              device=trainer.device, dist=trainer.dist)
    objective._references = lambda aligned, pairs, b: refs
    with torch.no_grad():
        ours = float(objective.loss(trainer.student, trainer.teacher, inputs, autocast=False))
    pairs = pair_list(trainer.crops.n_crops)
    by_pair = {pair: refs[i * batch:(i + 1) * batch] for i, pair in enumerate(pairs)}
    reference = ReferenceStep(trainer.student, copy.deepcopy(trainer.teacher), None, trainer.cfg,
                              trainer.base.patch_size, trainer.device)
    with torch.no_grad():
        theirs = float(reference.loss(inputs, refs=by_pair))
    return ours, theirs


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def main() -> None:
    from neco_train.data import collate
    from neco_train.model import param_groups
    from neco_train.trainer import StepInputs, TrainConfig, Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=112)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "neco_step.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = _images(Path(tmp) / "images", args.batch * (args.steps + 1))
        cfg = TrainConfig(model=args.model, data=str(folder), output=str(Path(tmp) / "run"), batch_size=args.batch,
                          global_size=args.global_size, local_size=args.local_size, workers=0, progress=False,
                          drop_path=0.0)
        trainer = Trainer(cfg)
        batches = [collate([trainer.dataset[(0, s * args.batch + i)] for i in range(args.batch)])
                   for s in range(args.steps + 1)]
        inputs = [StepInputs.from_batch(b, trainer.device) for b in batches]

        ours_loss, ref_loss = compare_losses(trainer, inputs[0])

        # the reference runs on its own copies of the same initial weights
        ref_student, ref_teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
        ref_opt = torch.optim.AdamW(param_groups(ref_student, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay))
        reference = ReferenceStep(ref_student, ref_teacher, ref_opt, cfg, trainer.base.patch_size, trainer.device)

        ours_t, ref_t, ref_sort, ref_bwd = [], [], [], []
        for s, (batch, inp) in enumerate(zip(batches, inputs)):
            t0 = time.perf_counter()
            trainer.train_step(batch)
            t_ours = time.perf_counter() - t0
            reference.sort_seconds = 0.0
            t0 = time.perf_counter()
            reference.step(inp, trainer.schedule(s)["momentum"])
            t_ref = time.perf_counter() - t0
            if s:  # step 0 is the warm-up
                ours_t.append(t_ours)
                ref_t.append(t_ref)
                ref_sort.append(reference.sort_seconds)
                ref_bwd.append(reference.backward_seconds)

    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    result = {
        "model": args.model, "batch": args.batch, "global_size": args.global_size, "local_size": args.local_size,
        "crops": "2 global + 4 local", "pairs": 10, "sort_rows_per_call": {"densebench": 10 * args.batch * 49,
                                                                          "reference": args.batch * 49},
        "threads": torch.get_num_threads(), "measured_steps": len(ours_t),
        "loss_same_batch_same_refs": {"densebench": ours_loss, "reference": ref_loss,
                                      "rel_diff": abs(ours_loss - ref_loss) / abs(ref_loss)},
        "seconds_per_step": {"densebench": ours_s, "reference": ref_s},
        "images_per_s": {"densebench": args.batch / ours_s, "reference": args.batch / ref_s},
        "throughput_ratio": ref_s / ours_s,
        "reference_sort_forward_s": statistics.median(ref_sort), "reference_backward_s": statistics.median(ref_bwd),
        "target": "throughput ratio >= 2, loss rel diff < 1e-5",
    }
    print(f"{'':28s}{'densebench':>14s}{'reference':>14s}")
    print(f"{'loss (same batch, refs)':28s}{ours_loss:14.6f}{ref_loss:14.6f}   rel diff "
          f"{result['loss_same_batch_same_refs']['rel_diff']:.1e}")
    print(f"{'seconds per step':28s}{ours_s:14.3f}{ref_s:14.3f}")
    print(f"{'images per second':28s}{args.batch / ours_s:14.2f}{args.batch / ref_s:14.2f}")
    print(f"throughput ratio: {ref_s / ours_s:.2f}x (target >= 2x); reference sort forward "
          f"{result['reference_sort_forward_s']:.2f}s, reference backward {result['reference_backward_s']:.2f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
