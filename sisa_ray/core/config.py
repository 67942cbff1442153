"""Frozen configuration dataclasses, one per concern.

Every dataclass is keyword-only, validated in ``__post_init__`` and round-trips through
``dataclasses.asdict`` / ``from_dict``. ``from_dict`` rejects unknown keys by name so a typo in a
config file or a Tune search space fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MODELS = ("mlp", "cnn", "wide_cnn", "resnet18")
# models whose layers normalise over the batch: their statistics would differ between a batch and
# its micro-batches, and each micro-batch's replica would update the running ones on its own
BATCH_NORM_MODELS = ("wide_cnn", "resnet18")
OPTIMIZERS = ("adam", "sgd")
EPOCH_SCHEDULES = ("sisa", "per_slice")
PLACEMENTS = ("hash", "prior", "group")
DEVICES = ("cpu", "cuda")
# the values of ATEN_CPU_CAPABILITY, i.e. the CPU kernels PyTorch dispatches to
CPU_CAPABILITIES = ("default", "avx2", "avx512", "zvector", "vsx", "sve128", "sve256")


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """Raise the standard error unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be an int >= {minimum}. Got {value!r} instead."
        )


def check_number(owner: str, name: str, value: Any, minimum: float, strict: bool = False,
                 maximum: float | None = None) -> None:
    """Raise the standard error unless ``value`` is a number (not a bool) above ``minimum``
    (``strict``: strictly) and, when given, at most ``maximum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > minimum if strict else value >= minimum) and (
            maximum is None or value <= maximum)
    if not ok:
        if maximum is None:
            bound = f"{'>' if strict else '>='} {minimum}"
        else:
            bound = f"in {'(' if strict else '['}{minimum}, {maximum}]"
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a number {bound}. Got {value!r} instead."
        )


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise the standard error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be one of {list(choices)}. "
            f"Got {value!r} instead."
        )


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict. Got {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} for {cls.__name__}. Known keys: {sorted(names)}."
        )
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How samples are split into shards and slices.

    A sample's shard and slice are a keyed hash of ``(id, seed, n_shards, n_slices)``; they never
    depend on row order or on which other samples exist (the exactness invariant, rule 1).

    With ``placement="prior"`` or ``"group"`` (deletion-aware sharding, Bourtoule et al. 2021,
    Section VI) a sample's shard is a pure function of its id and of a per-sample column
    instead: samples whose ``deletion_prior`` is at least ``hot_prior`` go to the first
    ``hot_shards`` shards, the rest to the others; or every sample of a ``group`` goes to the
    shard its group key hashes to. The placement is recorded in the store as a table, and
    ``placement_digest`` (filled in by ``fit``) names it, so a retrain uses the same placement.
    """

    n_shards: int = 8
    n_slices: int = 4
    seed: int = 0
    placement: str = "hash"
    hot_shards: int = 1
    hot_prior: float = 0.5
    placement_digest: str | None = None

    def __post_init__(self) -> None:
        check_int("ShardingConfig", "n_shards", self.n_shards, 1)
        check_int("ShardingConfig", "n_slices", self.n_slices, 1)
        check_int("ShardingConfig", "seed", self.seed, 0)
        check_choice("ShardingConfig", "placement", self.placement, PLACEMENTS)
        check_int("ShardingConfig", "hot_shards", self.hot_shards, 1)
        check_number("ShardingConfig", "hot_prior", self.hot_prior, 0.0, maximum=1.0)
        if self.placement == "prior" and self.hot_shards >= self.n_shards:
            raise ValueError(
                "The 'hot_shards' parameter of ShardingConfig must be < n_shards "
                f"({self.n_shards}) with placement='prior', so that some shards hold only "
                f"samples unlikely to be deleted. Got {self.hot_shards} instead."
            )
        if self.placement_digest is not None and self.placement == "hash":
            raise ValueError(
                "The 'placement_digest' parameter of ShardingConfig names a recorded placement; "
                "it must be None with placement='hash'. Got "
                f"{self.placement_digest!r} instead."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardingConfig:
        return from_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """How one shard model is trained.

    ``epoch_schedule="sisa"`` spreads ``epochs`` over the slice steps as in Bourtoule et al. (2021):
    step ``r`` (training on slices ``0..r``) runs about ``2E/(R+1)`` epochs, so a shard's total
    cost equals training it unsliced for ``E`` epochs. ``"per_slice"`` runs ``E`` epochs at every step.
    """

    model: str = "mlp"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    hidden: int = 128
    epoch_schedule: str = "sisa"
    threads: int = 1
    n_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    device: str = "cpu"
    cpu_capability: str | None = None
    backbone: str | None = None
    # each mini-batch's gradient is the sum, in order, of the gradients of this many contiguous
    # micro-batches, each computed on one thread: the bits do not depend on how many threads or
    # cores compute them, so a deletion that retrains one shard can use every idle core
    micro_batches: int = 1

    def __post_init__(self) -> None:
        check_choice("TrainingConfig", "model", self.model, MODELS)
        check_int("TrainingConfig", "epochs", self.epochs, 1)
        check_int("TrainingConfig", "batch_size", self.batch_size, 1)
        check_number("TrainingConfig", "lr", self.lr, 0.0, strict=True)
        check_choice("TrainingConfig", "optimizer", self.optimizer, OPTIMIZERS)
        check_number("TrainingConfig", "momentum", self.momentum, 0.0, strict=False)
        check_number("TrainingConfig", "weight_decay", self.weight_decay, 0.0, strict=False)
        check_int("TrainingConfig", "hidden", self.hidden, 1)
        check_choice("TrainingConfig", "epoch_schedule", self.epoch_schedule, EPOCH_SCHEDULES)
        check_int("TrainingConfig", "threads", self.threads, 1)
        if self.n_classes is not None:
            check_int("TrainingConfig", "n_classes", self.n_classes, 1)
        if self.input_shape is not None:
            shape = self.input_shape
            if (not isinstance(shape, (list, tuple)) or not shape
                    or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
                raise ValueError(
                    "The 'input_shape' parameter of TrainingConfig must be a non-empty list of "
                    f"ints >= 1 (the shape of one sample). Got {shape!r} instead."
                )
            object.__setattr__(self, "input_shape", tuple(shape))
        check_choice("TrainingConfig", "device", self.device, DEVICES)
        if self.cpu_capability is not None:
            check_choice("TrainingConfig", "cpu_capability", self.cpu_capability,
                         CPU_CAPABILITIES)
        if self.backbone is not None:
            if not isinstance(self.backbone, str) or len(self.backbone) != 64 or any(
                    c not in "0123456789abcdef" for c in self.backbone):
                raise ValueError(
                    "The 'backbone' parameter of TrainingConfig must be the SHA-256 (64 lower-case "
                    f"hex digits) of a frozen backbone file. Got {self.backbone!r} instead. Pass "
                    "the file itself to SISAEnsemble(backbone=...) or --backbone."
                )
            if self.model != "mlp":
                raise ValueError(
                    "The 'model' parameter of TrainingConfig is the head trained on the frozen "
                    f"backbone's features and must be 'mlp' with a backbone. Got {self.model!r} "
                    "instead; the backbone's own architecture is recorded in its file."
                )
        self._check_micro_batches()

    def _check_micro_batches(self) -> None:
        check_int("TrainingConfig", "micro_batches", self.micro_batches, 1)
        if self.micro_batches == 1:
            return
        if self.micro_batches > self.batch_size:
            raise ValueError(
                f"The 'micro_batches' parameter of TrainingConfig must be at most batch_size "
                f"({self.batch_size}): each micro-batch holds at least one sample. Got "
                f"{self.micro_batches} instead."
            )
        if self.threads != 1:
            raise ValueError(
                "The 'micro_batches' parameter of TrainingConfig needs threads=1: each "
                "micro-batch is computed on one thread, and the micro-batches run in parallel "
                f"instead. Got threads={self.threads} with micro_batches={self.micro_batches}; "
                "pass one of them."
            )
        if self.device != "cpu":
            raise ValueError(
                "The 'micro_batches' parameter of TrainingConfig splits a batch over CPU "
                f"threads; on {self.device!r} leave it at 1."
            )
        if self.model in BATCH_NORM_MODELS:
            raise ValueError(
                f"The 'micro_batches' parameter of TrainingConfig cannot split the batches of "
                f"{self.model!r}: its batch norm would see each micro-batch alone. Use "
                f"micro_batches=1, or a model without batch norm "
                f"({', '.join(m for m in MODELS if m not in BATCH_NORM_MODELS)})."
            )

    @property
    def resolved(self) -> bool:
        """Whether everything the bits depend on is pinned (see :meth:`SISAConfig.resolve`)."""
        return None not in (self.n_classes, self.input_shape, self.cpu_capability)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return from_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class SISAConfig:
    """Everything that determines the trained weights: sharding plus training.

    Two ensembles with equal ``config_hash()`` trained on equal data have bit-identical weights.
    Resources (CPUs, GPUs per actor) are not part of it: they change speed, not results.
    """

    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.sharding, ShardingConfig):
            raise TypeError(
                "The 'sharding' parameter of SISAConfig must be a ShardingConfig. "
                f"Got {type(self.sharding).__name__} instead."
            )
        if not isinstance(self.training, TrainingConfig):
            raise TypeError(
                "The 'training' parameter of SISAConfig must be a TrainingConfig. "
                f"Got {type(self.training).__name__} instead."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SISAConfig:
        if not isinstance(data, dict):
            raise TypeError(f"SISAConfig.from_dict expects a dict. Got {type(data).__name__}.")
        unknown = sorted(set(data) - {"sharding", "training"})
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} for SISAConfig. Known keys: ['sharding', 'training']."
            )
        return cls(
            sharding=ShardingConfig.from_dict(dict(data.get("sharding", {}))),
            training=TrainingConfig.from_dict(dict(data.get("training", {}))),
        )

    def resolve(self, *, n_classes: int, input_shape: tuple[int, ...],
                cpu_capability: str) -> SISAConfig:
        """This config with every unset part of the pinned runtime filled in: the number of
        outputs and the sample shape (from the dataset's definition, not from which samples are
        left) and the CPU capability PyTorch dispatches to. Set parts are kept, so a config
        read back from a store resolves to itself."""
        t = self.training
        return dataclasses.replace(self, training=dataclasses.replace(
            t,
            n_classes=t.n_classes if t.n_classes is not None else int(n_classes),
            input_shape=t.input_shape if t.input_shape is not None else tuple(input_shape),
            cpu_capability=t.cpu_capability or cpu_capability,
        ))

    def config_hash(self) -> str:
        """A short, stable digest of the config (canonical JSON, sorted keys). Options added
        later are left out while they hold their defaults, so existing stores keep their hash."""
        d = self.to_dict()
        for part, defaults in _LATER_OPTIONS.items():
            for key, default in defaults.items():
                if d[part][key] == default:
                    del d[part][key]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# options added after stores were first written, with their defaults (see config_hash)
_LATER_OPTIONS: dict[str, dict[str, Any]] = {
    "sharding": {"placement": "hash", "hot_shards": 1, "hot_prior": 0.5, "placement_digest": None},
    "training": {"backbone": None, "micro_batches": 1},
}


@dataclass(frozen=True, kw_only=True)
class ResourceConfig:
    """What each worker of the pool reserves, and how many shards train at once.

    Workers are long-lived; one that reserved a whole CPU would hold it while idle, so by default
    (``num_cpus=0``) a worker reserves only a token share of a CPU, and the pool has one worker
    per CPU (or GPU) of the cluster, each training one shard at a time. ``max_concurrent`` sets
    the number of workers instead.
    """

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        check_number("ResourceConfig", "num_cpus", self.num_cpus, 0.0, strict=False)
        check_number("ResourceConfig", "num_gpus", self.num_gpus, 0.0, strict=False)
        if self.max_concurrent is not None:
            check_int("ResourceConfig", "max_concurrent", self.max_concurrent, 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceConfig:
        return from_dict(cls, data)
