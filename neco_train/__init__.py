"""neco_train: NeCo (patch neighbour consistency) post-training for any timm ViT densebench can load.

    neco_train --data /data/coco --model dinov2_vits14_reg --output runs/neco
    torchrun --nproc_per_node 4 -m neco_train --data /data/coco --output runs/neco
    neco_train --data DIR --dry-run                      # projected time per epoch on this device
    neco_train --data DIR --bench voc-incontext,coco-things-linear --bench-data-root /data
    densebench run --model neco:runs/neco/last ...       # evaluate a checkpoint

Modules: ``sorting`` (differentiable sorting networks, equal to diffsort 0.2.0 at a fraction of its
cost), ``loss`` (the rank cross-entropy), ``crops`` (views and overlap boxes), ``model`` (backbone via
densebench's loaders + projection head, EMA, schedules), ``data`` (image folders, global-batch sampler),
``trainer`` (the step and the loop), ``checkpoint`` (safetensors + sidecar, atomic training state),
``distributed`` (torchrun/DDP), ``evaluation`` (``--bench``), ``cli``.

Defaults follow the published recipe (spec neco.md §6); where the reference code has slips, the fix is
the default and the reference behaviour is a named option (see ``trainer`` module docstring).
"""
