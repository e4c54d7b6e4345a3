"""Linear probe benchmark: cached augmented views vs the published recipe executed literally.

Two measurements on the synthetic suite, in one run (no timing assertions anywhere in the tests):

A. **How many cached views?** For every dataset and seed, the probe is trained on N = 1, 2, 4 cached
   augmented views per training image and on fresh views every epoch (N = epochs, which is exactly the
   published data stream: epoch e trains on view e). The views are nested (view v is the same draw
   whatever N), so one extraction of `epochs` views per (dataset, seed) serves every N. Reports mIoU
   per N and the mean difference to fresh views. This is the measurement behind the --train-views
   default (docs/linear.md).

B. **What does caching buy?** On one dataset: the published recipe executed literally (backbone forward
   on a freshly augmented view of every training image in every epoch, features upsampled before the
   head, plus the published per-epoch validation pass over the val set) vs densebench's cached probe
   (cold cache, then warm cache), same epochs, same head hyper-parameters. Reports wall-time ratios
   (target: >= 10x at 25 epochs) and the mIoU difference (target: within 1 point).

The synthetic splits hold 48 training images, so the published head batch of 128 would be a single
step per epoch; the head batch defaults to 4 here (both sides use the same value). Forward batches are
the same size on both sides. Writes bench/results/linear.json.

    python bench/linear.py [--model random:vit_small_patch16_224] [--input-size 224] [--seeds 400,401]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densebench.api import build_config
from densebench.benchmark_table import get_benchmark
from densebench.data import open_dataset, splits
from densebench.data.synth import SCALES, write_synthetic_suite
from densebench.encoders import load_encoder
from densebench.features import FeatureCache
from densebench.metrics import segmentation_scores
from densebench.protocols.linear import (
    DEFAULT_TRAIN_VIEWS,
    epoch_batches,
    evaluate_head,
    head_logits,
    make_head,
    run,
)
from densebench.transforms import LinearTrainView, ResizeView, normalisation


def literal_recipe(encoder, data_root: Path, cfg, *, epoch_val: bool = True) -> dict:
    """The published linear probe as written: every epoch re-augments and re-encodes every training image.

    Same seeds, batch order, head init and schedule as densebench's probe; features are upsampled before
    the head (the published order) and nothing is cached. With ``epoch_val`` the published per-epoch
    validation runs too (val images encoded again, features upsampled to train_mask_size, mIoU), timed apart.
    """
    mean, std = normalisation(cfg.normalization, encoder)
    tr_split, va_split = splits(cfg.dataset)
    train, val = open_dataset(cfg.dataset, data_root, tr_split), open_dataset(cfg.dataset, data_root, va_split)
    C, ignore, m = val.num_classes, val.ignore_index, cfg.train_mask_size
    eval_size = cfg.eval_size or cfg.input_size
    val_view = ResizeView(cfg.input_size, mask_size=eval_size, mean=mean, std=std)
    encoder.eval()

    def encode_val() -> dict:
        feats, masks = [], []
        for start in range(0, len(val), cfg.head_batch_size):
            items = [val_view(i, *val[i][1:]) for i in range(start, min(len(val), start + cfg.head_batch_size))]
            with torch.inference_mode():
                feats.append(encoder(torch.stack([x for x, _ in items])).float().numpy())
            masks.append(torch.stack([y for _, y in items]).numpy())
        return {"features": np.concatenate(feats), "masks": np.concatenate(masks)}

    t0 = time.perf_counter()
    head = make_head(encoder.embed_dim, C, cfg.seed)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_drop_epoch, gamma=cfg.lr_gamma)
    order = torch.Generator().manual_seed(cfg.seed)
    forwards, val_s, curve = 0, 0.0, []
    for epoch in range(cfg.epochs):
        view = LinearTrainView(cfg.input_size, m, seed=cfg.seed, view=epoch, mean=mean, std=std,
                               scale=(cfg.crop_min_scale, 1.0), flip=cfg.flip)
        losses = []
        head.train()
        for idx in epoch_batches(len(train), cfg.head_batch_size, cfg.drop_last, order):
            items = [view(int(i), *train[int(i)][1:]) for i in idx]
            target = torch.stack([y for _, y in items]).long()
            with torch.inference_mode():
                feats = encoder(torch.stack([x for x, _ in items])).float()
            forwards += len(idx)
            if not bool((target != ignore).any()):
                continue
            loss = F.cross_entropy(head_logits(head, feats.clone(), m, "features"), target, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        curve.append(float(np.mean(losses)))
        if epoch_val:
            tv = time.perf_counter()
            store = encode_val()
            forwards += len(val)
            evaluate_head(head, store, C, ignore, m, "features")
            val_s += time.perf_counter() - tv
    store = encode_val()
    forwards += len(val)
    conf = evaluate_head(head, store, C, ignore, eval_size, "features")
    total = time.perf_counter() - t0
    return {"miou": segmentation_scores(conf.matrix, matching="identity")["miou"], "wall_s": total,
            "epoch_val_s": val_s, "wall_without_epoch_val_s": total - val_s, "forwards": forwards,
            "train_loss_curve": curve}


def config_for(dataset: str, args, **kw):
    bench = get_benchmark(f"{dataset}-linear")
    opts = {"input_size": args.input_size, "head_batch_size": args.head_batch_size, "epochs": args.epochs,
            "lr": args.lr, "batch_size": args.head_batch_size, "train_mask_size": args.train_mask_size}
    cfg = build_config(bench, opts)
    return dataclasses.replace(cfg, **kw)


def views_table(args, data: Path, tmp: Path) -> dict:
    """Part A: mIoU per number of cached views, per dataset and seed."""
    enc = load_encoder(args.model)
    rows: dict[str, dict[str, list[float]]] = {}
    counts = sorted(set(args.views)) + [args.epochs]
    for dataset in args.datasets:
        rows[dataset] = {str(n): [] for n in counts}
        for seed in args.seeds:
            cache = FeatureCache(tmp / "views-cache")
            for n in counts:
                res = run(enc, data, config_for(dataset, args, train_views=n, seed=seed), cache=cache, progress=False)
                rows[dataset][str(n)].append(res["metrics"]["miou"])
                print(f"  {dataset:<12} seed {seed}  views {n:>2}: mIoU {res['metrics']['miou']:6.2f}", flush=True)
    diffs = {str(n): [] for n in counts[:-1]}
    for dataset in rows:
        for n in counts[:-1]:
            diffs[str(n)] += [a - b for a, b in zip(rows[dataset][str(n)], rows[dataset][str(args.epochs)])]
    summary = {n: {"mean_diff_vs_fresh": statistics.mean(d), "std_diff": statistics.pstdev(d),
                   "max_abs_diff": max(abs(x) for x in d)} for n, d in diffs.items()}
    # seed-to-seed spread of the fresh-view probe itself: the noise floor the differences are compared to
    seed_spread = (statistics.mean(statistics.pstdev(rows[d][str(args.epochs)]) for d in rows)
                   if len(args.seeds) > 1 else None)
    return {"miou": rows, "summary": summary, "fresh_views": args.epochs, "seed_spread_fresh": seed_spread}


def timing(args, data: Path, tmp: Path) -> dict:
    """Part B: literal recipe vs cached probe (cold and warm cache), same epochs."""
    cfg = config_for(args.timing_dataset, args, seed=args.seeds[0], train_views=args.train_views)
    enc = load_encoder(args.model)
    lit = literal_recipe(enc, data, cfg, epoch_val=True)
    cache = FeatureCache(tmp / "timing-cache")
    out = {"literal": lit}
    for label in ("cold", "warm"):
        before = enc.images_forwarded
        t0 = time.perf_counter()
        res = run(enc, data, cfg, cache=cache, progress=False)
        out[label] = {"wall_s": time.perf_counter() - t0, "miou": res["metrics"]["miou"],
                      "forwards": enc.images_forwarded - before, "timings": res["provenance"]["timings"]}
    out["ratio_cold"] = lit["wall_s"] / out["cold"]["wall_s"]
    out["ratio_cold_without_epoch_val"] = lit["wall_without_epoch_val_s"] / out["cold"]["wall_s"]
    out["ratio_warm"] = lit["wall_s"] / out["warm"]["wall_s"]
    out["miou_diff"] = out["cold"]["miou"] - lit["miou"]
    out["config"] = dataclasses.asdict(cfg)
    return out


def synthetic_scale(train_scale: int) -> str:
    """The synthetic suite's default scale, or a variant with ``train_scale`` times more training images.

    Used to see how the gap between cached and fresh views changes with the size of the training split
    (the published splits are ~200x larger than the synthetic ones). Validation splits stay the same.
    """
    if train_scale == 1:
        return "default"
    name = f"bench-train-x{train_scale}"
    base = SCALES["default"]
    SCALES[name] = {**base, "voc": {"trainaug": base["voc"]["trainaug"] * train_scale, "val": base["voc"]["val"]},
                    "ade20k": {"training": base["ade20k"]["training"] * train_scale,
                               "validation": base["ade20k"]["validation"]},
                    "coco": {"train": base["coco"]["train"] * train_scale, "val": base["coco"]["val"]}}
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vit_small_patch16_224")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--train-mask-size", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--head-batch-size", type=int, default=4)
    ap.add_argument("--datasets", default="voc,coco-things,coco-stuff,ade20k")
    ap.add_argument("--seeds", default="400,401")
    ap.add_argument("--views", default="1,2,4")
    ap.add_argument("--train-views", type=int, default=DEFAULT_TRAIN_VIEWS, help="cached views in part B")
    ap.add_argument("--timing-dataset", default="voc")
    ap.add_argument("--skip-views", action="store_true", help="only part B")
    ap.add_argument("--skip-timing", action="store_true", help="only part A")
    ap.add_argument("--train-scale", type=int, default=1, help="synthetic training splits this many times larger")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear.json"))
    args = ap.parse_args()
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.views = [int(v) for v in args.views.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_suite(tmp / "data", seed=0, scale=synthetic_scale(args.train_scale))
        print(f"A. cached views vs fresh views every epoch ({args.model}, input {args.input_size}, "
              f"{args.epochs} epochs, head batch {args.head_batch_size}, lr {args.lr})")
        views = None if args.skip_views else views_table(args, tmp / "data", tmp)
        tim = None
        if not args.skip_timing:
            print(f"\nB. literal published recipe vs cached probe ({args.timing_dataset}, "
                  f"{args.train_views} cached views)")
            tim = timing(args, tmp / "data", tmp)

    if views:
        counts = list(views["miou"][args.datasets[0]])
        print(f"\n{'dataset':<14}" + "".join(f"{('fresh' if c == str(args.epochs) else c + ' view(s)'):>12}"
                                           for c in counts))
        for d, row in views["miou"].items():
            print(f"{d:<14}" + "".join(f"{statistics.mean(row[c]):>12.2f}" for c in counts))
        print(f"{'mean diff':<14}" + "".join(f"{views['summary'][c]['mean_diff_vs_fresh']:>+12.2f}"
                                           for c in counts[:-1]) + f"{'0':>12}")
        if views["seed_spread_fresh"] is not None:
            print(f"seed-to-seed std of the fresh-view probe (mean over datasets): {views['seed_spread_fresh']:.2f}")
    if tim:
        print_timing(tim)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "views": views, "timing": tim,
                               "torch_threads": torch.get_num_threads()}, indent=1, default=str) + "\n")
    print(f"wrote {out}")


def print_timing(tim: dict) -> None:
    lit, cold, warm = tim["literal"], tim["cold"], tim["warm"]
    print(f"\n{'run':<34}{'wall s':>9}{'forwards':>10}{'mIoU':>8}")
    print(f"{'literal (with per-epoch val)':<34}{lit['wall_s']:>9.1f}{lit['forwards']:>10d}{lit['miou']:>8.2f}")
    print(f"{'literal, per-epoch val excluded':<34}{lit['wall_without_epoch_val_s']:>9.1f}{'':>10}{'':>8}")
    print(f"{'densebench, cold cache':<34}{cold['wall_s']:>9.1f}{cold['forwards']:>10d}{cold['miou']:>8.2f}")
    print(f"{'densebench, warm cache':<34}{warm['wall_s']:>9.1f}{warm['forwards']:>10d}{warm['miou']:>8.2f}")
    print(f"\nspeed-up, cold cache: {tim['ratio_cold']:.1f}x (without the published per-epoch val: "
          f"{tim['ratio_cold_without_epoch_val']:.1f}x), warm cache: {tim['ratio_warm']:.1f}x  (target >= 10x)")
    print(f"mIoU difference (densebench - literal): {tim['miou_diff']:+.2f} points  (target within 1)")


if __name__ == "__main__":
    main()
