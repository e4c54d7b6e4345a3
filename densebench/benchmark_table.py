"""The benchmark table: one frozen :class:`BenchmarkSpec` per benchmark, in one place.

A benchmark is data plus metadata (MTEB's ``TaskMetadata``): which protocol runs on which dataset
family, with which published settings, which metric is its headline, which config fields do not
change its numbers, how its canonical config is resolved for a given model, what the embedded
default changes on the synthetic suite, and whom to cite. The CLI, the API, the leaderboard and the
report read everything from here; nothing registers itself by being imported.

Every result belongs to a named protocol version (:meth:`BenchmarkSpec.version_of`): the Config's ``protocol``
field where the protocol has several (in-context: ``hbird-2.0``, ``hbird-1.1``), else the one recipe in
:data:`DEFAULT_VERSIONS`. "Standard" means the canonical config of that version, and the leaderboard compares a
result only with entries of its version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

from .data.families import ADE20K, COCO_STUFF, COCO_THINGS, DAVIS, SPAIR, VOC, DatasetFamily
from .errors import ConfigError, choices_message
from .options import non_semantic_fields
from .protocols import correspondence, davis, incontext, linear, overcluster

#: Canonical-config resolver: (config as JSON, model record) -> the config a run of that model records.
Resolver = Callable[[dict, dict], dict]

#: The protocol version of a result whose config has no ``protocol`` field (or leaves it unset): the code
#: behind each protocol's published rows.
DEFAULT_VERSIONS = {"incontext": "hbird-2.0", "linear": "neco-leopart", "overcluster": "neco-leopart",
                    "correspondence": "probe3d", "davis": "dino"}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything that identifies one benchmark. ``protocol`` is the protocol module (``Config``, ``run``)."""

    name: str
    protocol: ModuleType
    dataset: DatasetFamily
    description: str
    main_metric: str
    headline_metrics: tuple[str, ...]
    citations: tuple[str, ...]
    non_semantic_fields: frozenset[str]
    resolve_canonical: Resolver = field(repr=False)
    #: Config fields that differ from the protocol's defaults for this benchmark (published differences).
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: What the embedded default (`densebench run` with no arguments) changes on the synthetic suite so
    #: every benchmark finishes in seconds on a CPU; never used otherwise, and labelled in its results.
    synthetic: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.main_metric not in self.headline_metrics:
            raise ValueError(f"{self.name}: main metric {self.main_metric} is not among {self.headline_metrics}")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "synthetic", MappingProxyType(dict(self.synthetic)))

    @property
    def protocol_name(self) -> str:
        """``incontext``, ``linear``, ``overcluster``, ``correspondence``."""
        return self.protocol.__name__.rsplit(".", 1)[-1]

    @property
    def config_class(self) -> type:
        return self.protocol.Config

    def default_config(self, **changes: Any):
        """The published config of this benchmark (validated), with ``changes`` applied."""
        return self.protocol.Config(dataset=self.dataset.name, **{**self.overrides, **changes})

    def version_of(self, config: Mapping | None = None) -> str | None:
        """The named protocol version of a (recorded) config: its ``protocol`` field, else the protocol's one
        recipe (:data:`DEFAULT_VERSIONS`); None for a protocol without named versions."""
        return (config or {}).get("protocol") or DEFAULT_VERSIONS.get(self.protocol_name)

    def canonical_config(self, model: dict | None = None, version: str | None = None) -> dict:
        """The published config of protocol ``version`` (default: the default version) as a run of ``model``
        records it (automatic fields resolved), as JSON."""
        from .results import jsonable

        versioned = "protocol" in {f.name for f in dataclasses.fields(self.config_class)}
        changes = {"protocol": version} if versioned and version not in (None, self.version_of()) else {}
        config = jsonable(dataclasses.asdict(self.default_config(**changes)))
        return jsonable(self.resolve_canonical(dict(config), dict(model))) if model is not None else config

    def encoder_choices(self, model: Mapping) -> tuple[dict, dict]:
        """``(recorded, canonical)`` encoder settings that change this benchmark's numbers, for the leaderboard's
        config check: a timm ViT's position-embedding resampling, canonically the one the code behind the
        published rows used (``--pos-interp auto``). Empty for other encoders."""
        from .encoders.timm_encoder import POS_INTERP, auto_pos_interp

        mode = model.get("pos_interp")
        if mode not in POS_INTERP:
            return {}, {}
        default = model.get("pos_interp_default") or mode
        return {"pos_interp": mode}, {"pos_interp": auto_pos_interp(self.protocol_name, default)}

    def run(self, encoder, data_root, config=None, *, pos_interp: str | None = None, **kwargs):
        """Run this benchmark's protocol (``config`` defaults to the published one); returns a Result.
        ``pos_interp`` (``auto`` or a mode) sets the encoder's position-embedding resampling for this run;
        None runs the encoder as it is."""
        config = config or self.default_config()
        if pos_interp is None:
            return self.protocol.run(encoder, data_root, config, benchmark=self.name, **kwargs)
        from .encoders import pos_interp_for

        with pos_interp_for(encoder, pos_interp, self.protocol_name):
            return self.protocol.run(encoder, data_root, config, benchmark=self.name, **kwargs)


def _reads_old_configs(resolve: Resolver) -> Resolver:
    """``resolve`` for configs recorded before ``limit`` (every protocol's ``--limit``) existed: they ran on whole
    splits, i.e. ``limit`` None."""
    def resolved(config: dict, model: dict) -> dict:
        return resolve({"limit": None, **config}, model)

    resolved.__doc__ = resolve.__doc__
    return resolved


def spec(name: str, protocol: ModuleType, dataset: DatasetFamily, description: str, *, main_metric: str,
         headline: Iterable[str] | None = None, citations: Iterable[str], overrides: Mapping | None = None,
         synthetic: Mapping | None = None) -> BenchmarkSpec:
    """A spec whose non-semantic fields and canonical resolver are the protocol's declared ones."""
    return BenchmarkSpec(name=name, protocol=protocol, dataset=dataset, description=description,
                         main_metric=main_metric, headline_metrics=tuple(headline or (main_metric,)),
                         citations=tuple(citations), non_semantic_fields=non_semantic_fields(protocol.Config),
                         resolve_canonical=_reads_old_configs(protocol.resolve_canonical), overrides=overrides or {},
                         synthetic=synthetic or {})


class BenchmarkTable(Mapping):
    """An ordered, read-only name -> spec table that refuses duplicate names."""

    def __init__(self, specs: Iterable[BenchmarkSpec]):
        self._specs: dict[str, BenchmarkSpec] = {}
        for s in specs:
            if s.name in self._specs:
                raise ValueError(f"benchmark {s.name!r} is defined twice")
            self._specs[s.name] = s

    def __getitem__(self, name: str) -> BenchmarkSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


HBIRD = "Balazevic et al., Towards In-context Scene Understanding, NeurIPS 2023 (Hummingbird)"
HBIRD_CODE = "Pariza et al., open-hummingbird-eval (github.com/vpariza/open-hummingbird-eval)"
LEOPART = "Ziegler & Asano, Self-Supervised Learning of Object Parts for Semantic Segmentation, CVPR 2022 (Leopart)"
NECO = ("Pariza et al., Near, far: Patch-ordering enhances vision foundation models' scene understanding, "
        "ICLR 2025 (NeCo)")
PROBE3D = "El Banani et al., Probing the 3D Awareness of Visual Foundation Models, CVPR 2024 (probe3d)"
SPAIR_PAPER = "Min et al., SPair-71k: A Large-scale Benchmark for Semantic Correspondence, arXiv 1908.10543"
DINO = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021 (DINO)"
DAVIS_2017 = "Pont-Tuset et al., The 2017 DAVIS Challenge on Video Object Segmentation, arXiv 1704.00675"

#: The embedded default's linear-probe settings: its splits hold 48 training images, so the published batch
#: of 128 would make one SGD step per epoch; batches of 4 and lr 0.1 give the head a usable budget.
_LINEAR_SYNTHETIC = {"input_size": 112, "train_mask_size": 28, "head_batch_size": 4, "lr": 0.1}
#: ~4.7k tokens on the synthetic suite: a smaller input and fewer k-means iterations, K=500 kept.
_OVERCLUSTER_SYNTHETIC = {"input_size": 224, "clusters": ("gt", "500"), "seeds": 2, "kmeans_iters": 20,
                          "kmeans_restarts": 1}
_CLASS_MEAN = {"voc": "21 classes", "ade20k": "151-class mean as published; 150-class mean reported too",
               "coco-things": "fixed 10% train2017 list", "coco-stuff": "fixed 10% train2017 list"}

_SPECS = [
    spec("voc-incontext", incontext, VOC,
         "Hummingbird in-context retrieval segmentation, Pascal VOC 2012 (trainaug memory, val queries)",
         main_metric="miou", citations=(HBIRD, HBIRD_CODE), synthetic={"input_size": 224}),
    spec("ade20k-incontext", incontext, ADE20K,
         "Hummingbird in-context retrieval segmentation, ADE20K (151-class mean as published)",
         main_metric="miou", citations=(HBIRD, HBIRD_CODE), synthetic={"input_size": 224}),
    *[spec(f"{fam.name}-linear", linear, fam, f"Linear segmentation probe (Leopart/NeCo), {fam.title}: "
           f"{fam.train_split} -> {fam.val_split}; {_CLASS_MEAN[fam.name]}", main_metric="miou",
           citations=(LEOPART, NECO), overrides={"drop_last": True} if fam is VOC else {},
           synthetic=_LINEAR_SYNTHETIC)
      for fam in (VOC, ADE20K, COCO_THINGS, COCO_STUFF)],
    *[spec(f"{fam.name}-overcluster", overcluster, fam,
           f"K-means (over)clustering of val tokens with Hungarian (K=gt) / many-to-one matching, {fam.title} "
           f"{fam.val_split}",
           main_metric="miou@500", headline=("miou@gt", "miou@300", "miou@500"), citations=(LEOPART, NECO),
           synthetic=_OVERCLUSTER_SYNTHETIC)
      for fam in (VOC, ADE20K, COCO_THINGS, COCO_STUFF)],
    spec("spair-correspondence", correspondence, SPAIR,
         "SPair-71k keypoint correspondence (probe3d): PCK@0.1 of the target bbox, nearest neighbour on raw "
         "last-block features, mean over categories",
         main_metric="pck@0.10", citations=(PROBE3D, SPAIR_PAPER), synthetic={"input_size": 224}),
    spec("davis-propagation", davis, DAVIS,
         "DAVIS-2017 val semi-supervised video object segmentation by label propagation (DINO's recipe): J&F "
         "of the official davis2017-evaluation", main_metric="j_and_f", headline=("j_and_f", "j_mean", "f_mean"),
         citations=(DINO, DAVIS_2017), synthetic={"short_side": 128}),
]

BENCHMARKS = BenchmarkTable(_SPECS)


def benchmarks() -> list[BenchmarkSpec]:
    """Every benchmark, in table order (the order listings and leaderboards use)."""
    return list(BENCHMARKS.values())


def get_benchmark(name: str) -> BenchmarkSpec:
    """One benchmark by name; a ConfigError names the accepted ones."""
    if name not in BENCHMARKS:
        raise ConfigError(choices_message("benchmark", name, BENCHMARKS))
    return BENCHMARKS[name]


def select(names: Iterable[str]) -> list[BenchmarkSpec]:
    """Benchmarks by name or group, in table order without repeats. A group is ``all``, a protocol
    (``incontext``, ``linear``, ``overcluster``, ``correspondence``, ``davis``) or a dataset family (``voc``,
    ``ade20k``, ``coco-things``, ``coco-stuff``, ``spair``, ``davis``)."""
    chosen: set[str] = set()
    for name in names:
        if name in BENCHMARKS:
            chosen.add(name)
            continue
        group = {s.name for s in BENCHMARKS.values()
                 if name in ("all", s.protocol_name, s.dataset.name)}
        if not group:
            accepted = [*BENCHMARKS, "all", *groups()]
            raise ConfigError(choices_message("benchmark or group", name, accepted))
        chosen |= group
    return [s for s in BENCHMARKS.values() if s.name in chosen]


def groups() -> list[str]:
    """The group names :func:`select` accepts besides ``all``: protocols, then dataset families."""
    names = [s.protocol_name for s in BENCHMARKS.values()] + [s.dataset.name for s in BENCHMARKS.values()]
    return list(dict.fromkeys(names))


def find_benchmark(name: str) -> BenchmarkSpec | None:
    """The spec, or None for a benchmark this densebench does not know (e.g. in an older leaderboard)."""
    return BENCHMARKS.get(name)


def benchmark_order(name: str) -> tuple:
    """Sort key: table order, unknown benchmarks last by name."""
    names = list(BENCHMARKS)
    return (names.index(name) if name in BENCHMARKS else len(names), name)
