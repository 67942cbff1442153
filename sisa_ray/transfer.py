"""Transfer from public data: a frozen backbone, a small head per shard.

Bourtoule et al. (2021, Section VI) close part of SISA's accuracy gap with transfer learning: a
feature extractor trained on data that is never subject to deletion (a public set) is frozen,
and each shard trains only a small head on its features. Deletions then retrain heads.

A backbone file is a ``torch.save`` archive of tensors and primitives, read back with
``torch.load(..., weights_only=True)``: the architecture's name (one of the model zoo's, whose
penultimate layer gives the features), the input shape, hidden width and class count it was
built with, its state dict, and the ids of the public samples it saw. Its SHA-256 goes into
``TrainingConfig.backbone``, so the config hash names it and a worker refuses any other file.

Features are a pure function of one sample: :func:`embed` runs the backbone on one sample at a
time, so a sample's features never depend on which other samples share its batch (CPU kernels
may block a batch differently by its size). A fresh fit on fewer samples therefore computes the
same features, and the cached features a deletion keeps are the ones a fresh fit would compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .core.config import MODELS, ShardingConfig, TrainingConfig
from .core.data import SampleSet
from .core.plan import keyed_hash

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"
PUBLIC_IDS_FILE = "public_ids.parquet"
EMBEDDING_COLUMN = "embedding"
_EMBEDDING_META = b"sisa_ray.embedding_backbone"
_FORMAT = 1
_PUBLIC_TAG = 0x9B1C


@dataclass(frozen=True)
class Backbone:
    """A frozen feature extractor read from a backbone file.

    Parameters
    ----------
    arch : model zoo name (``mlp``, ``cnn``, ``resnet18``; ``resnet18`` is torchvision's)
    input_shape : shape of one sample it takes
    hidden : hidden width it was built with
    n_classes : outputs of the classifier it was pretrained as (its last layer is not used)
    state : its state dict
    public_ids : ids of the public samples it was trained on
    sha256 : SHA-256 of the file
    """

    arch: str
    input_shape: tuple[int, ...]
    hidden: int
    n_classes: int
    state: dict
    public_ids: np.ndarray
    sha256: str

    def module(self, device=None):
        """The backbone as a torch module in eval mode, its parameters frozen."""
        import torch

        from .models import build_model

        model = build_model(self.arch, self.input_shape, self.n_classes, hidden=self.hidden)
        model.load_state_dict(self.state)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device or torch.device("cpu")).eval()


def backbone_bytes(arch: str, input_shape: tuple[int, ...], hidden: int, n_classes: int,
                   state: dict, public_ids: np.ndarray) -> bytes:
    """Serialise a backbone file (see the module docstring)."""
    import torch

    buf = io.BytesIO()
    torch.save({
        "format": _FORMAT, "arch": arch, "input_shape": [int(d) for d in input_shape],
        "hidden": int(hidden), "n_classes": int(n_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "public_ids": torch.from_numpy(np.sort(np.asarray(public_ids, dtype=np.int64))),
    }, buf)
    return buf.getvalue()


def load_backbone(blob: bytes, where: str) -> Backbone:
    """Read a backbone file with ``weights_only=True``; ``where`` names it in errors."""
    import torch

    try:
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the same thing)
        raise ValueError(
            f"{where} is not a backbone file torch.load(weights_only=True) can read ({e}). "
            "Write it with `sisa-ray pretrain`, or torch.save a dict of 'arch', 'input_shape', "
            "'hidden', 'n_classes', 'state_dict' and 'public_ids'."
        ) from None
    keys = ("arch", "input_shape", "hidden", "n_classes", "state_dict", "public_ids")
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing} of a backbone file. Write it with "
                         "`sisa-ray pretrain`.")
    if d["arch"] not in MODELS:
        raise ValueError(f"{where}: the 'arch' of a backbone must be one of {list(MODELS)}. "
                         f"Got {d['arch']!r}.")
    return Backbone(
        arch=d["arch"], input_shape=tuple(int(v) for v in d["input_shape"]),
        hidden=int(d["hidden"]), n_classes=int(d["n_classes"]), state=d["state_dict"],
        public_ids=np.asarray(d["public_ids"].numpy(), dtype=np.int64),
        sha256=hashlib.sha256(blob).hexdigest(),
    )


def embed(module, features: np.ndarray, device=None) -> np.ndarray:
    """Backbone features (penultimate layer), float32, shape (N, F), one sample at a time so
    each row is a pure function of its sample (see the module docstring)."""
    import torch

    x = torch.from_numpy(np.array(features, dtype=np.float32))
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            rows.append(module.features(x[i:i + 1].to(device or "cpu")).cpu())
    if not rows:
        return np.zeros((0, feature_width(module, tuple(x.shape[1:]))), dtype=np.float32)
    return torch.cat(rows).numpy().astype(np.float32, copy=False)


def feature_width(module, input_shape: tuple[int, ...]) -> int:
    """Number of features the backbone gives per sample (probed on the module's own device)."""
    import torch

    device = next(module.parameters()).device
    with torch.no_grad():
        return int(module.features(torch.zeros((1, *input_shape), device=device)).shape[1])


# -- the public split and its ids -------------------------------------------------------------------


def public_split(data: SampleSet, n_public: int, seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """Hold out ``n_public`` samples of ``data`` as public: those with the smallest keyed hash of
    their id under ``seed``. Returns ``(public, rest)``; the rest is what may be sharded."""
    if isinstance(n_public, bool) or not isinstance(n_public, int) or not 0 < n_public < len(data):
        raise ValueError(
            f"The 'n_public' parameter must be an int in [1, {len(data) - 1}] (fewer than the "
            f"{len(data)} samples). Got {n_public!r} instead."
        )
    h = keyed_hash(data.ids, _PUBLIC_TAG, seed)
    order = np.lexsort((data.ids, h))
    mask = np.zeros(len(data), dtype=bool)
    mask[order[:n_public]] = True
    public = data.take(mask)
    public = SampleSet(ids=public.ids, features=public.features, labels=public.labels,
                       n_classes=public.n_classes, name=f"{data.name}-public", task=public.task)
    return public, data.take(~mask)


def public_ids_table(public_ids: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(np.sort(np.asarray(public_ids, dtype=np.int64)), pa.int64())})


def refuse_public(public_ids: np.ndarray, ids: np.ndarray, what: str) -> None:
    """Raise a ValueError naming the ``ids`` that belong to the public set."""
    hit = np.intersect1d(np.asarray(ids, dtype=np.int64), public_ids)
    if hit.size:
        raise ValueError(
            f"{hit.size} id(s) of {what} belong to the public set the frozen backbone was trained "
            f"on: {hit[:20].tolist()}{' ...' if hit.size > 20 else ''}. Public samples are never "
            "sharded and cannot be unlearned by retraining heads; to unlearn them, pretrain a new "
            "backbone without them and train a new store."
        )


# -- cached features in a shard's data file ---------------------------------------------------------


def with_embedding(table: pa.Table, features: np.ndarray, backbone_sha: str) -> pa.Table:
    """``table`` with each row's backbone features as an extra column, tagged by the backbone."""
    feats = np.ascontiguousarray(features, dtype=np.float32)
    width = feats.shape[1] if feats.ndim == 2 else 0
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), width)
    if EMBEDDING_COLUMN in table.column_names:
        table = table.drop_columns([EMBEDDING_COLUMN])
    meta = dict(table.schema.metadata or {})
    meta[_EMBEDDING_META] = backbone_sha.encode()
    return table.append_column(EMBEDDING_COLUMN, col).replace_schema_metadata(meta)


def cached_embedding(table: pa.Table, backbone_sha: str) -> np.ndarray | None:
    """The cached features of ``table``'s rows, or None when it has none for this backbone."""
    meta = table.schema.metadata or {}
    if EMBEDDING_COLUMN not in table.column_names or meta.get(_EMBEDDING_META) != \
            backbone_sha.encode():
        return None
    col = table.column(EMBEDDING_COLUMN).combine_chunks()
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(table.num_rows, col.type.list_size)


# -- pretraining --------------------------------------------------------------------------------------

AUGMENTATIONS = ("none", "shift", "shift-flip")
MAX_SHIFT = 2


def augmenter(kind: str, input_shape: tuple[int, ...]):
    """A mini-batch transform for pretraining on images, or None for ``"none"``.

    ``shift`` moves each image by a random offset of up to :data:`MAX_SHIFT` pixels in each
    direction (zero padding); ``shift-flip`` also mirrors each image left to right with
    probability 1/2 (right for clothes and objects, wrong for digits and text). The offsets and
    flips come from torch's global stream, which the training loop seeds per epoch, so the same
    public data and seed give the same backbone. Shards never augment: only the public set, whose
    samples are never deleted, is trained this way.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"The 'augment' parameter must be one of {list(AUGMENTATIONS)}. Got "
                         f"{kind!r} instead.")
    if kind == "none":
        return None
    import torch

    from .models import image_shape

    shape = image_shape(input_shape)
    h, w = shape[1:]
    k = MAX_SHIFT

    def apply(x):
        n = x.shape[0]
        img = x.reshape(n, *shape)
        if kind == "shift-flip":
            flip = torch.rand(n, device=x.device) < 0.5
            img = torch.where(flip[:, None, None, None], img.flip(3), img)
        padded = torch.nn.functional.pad(img, (k, k, k, k))
        dy = torch.randint(0, 2 * k + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * k + 1, (n,), device=x.device)
        out = torch.empty_like(img)
        for oy in range(2 * k + 1):
            for ox in range(2 * k + 1):
                rows = torch.nonzero((dy == oy) & (dx == ox)).flatten()
                if rows.numel():
                    out[rows] = padded[rows, :, oy:oy + h, ox:ox + w]
        return out.reshape(x.shape)

    return apply


def pretrain(public: SampleSet, training: TrainingConfig, seed: int = 0,
             augment: str = "none") -> bytes:
    """Train a model of ``training.model`` on the public set and return its backbone file.

    The model trains as one unsliced shard with the package's deterministic loop (so the same
    public data, seed and ``augment`` (see :func:`augmenter`) give the same bytes); its
    penultimate layer is the backbone.
    """
    import torch

    from .core.training import deterministic_torch, init_seed, make_optimizer, train_steps
    from .models import build_model

    if public.task != "classification":
        raise ValueError(f"pretrain needs a classification set; {public.name} is {public.task}.")
    transform = augmenter(augment, public.input_shape)
    sharding = ShardingConfig(n_shards=1, n_slices=1, seed=seed)
    training = dataclasses.replace(training, backbone=None)
    model = build_model(training.model, public.input_shape, public.n_classes,
                        hidden=training.hidden, seed=init_seed(sharding, 0))
    optimizer = make_optimizer(model, training)
    with deterministic_torch(training.threads):
        for res in train_steps(model, optimizer, public.features, public.labels, public.ids,
                               np.zeros(len(public), dtype=np.int64), sharding=sharding,
                               training=training, shard=0, start_step=0,
                               device=torch.device("cpu"), augment=transform):
            log.info("pretrained %s on %d public samples in %.1fs", training.model,
                     res.n_samples, res.seconds)
    return backbone_bytes(training.model, public.input_shape, training.hidden, public.n_classes,
                          model.state_dict(), public.ids)


# -- what a store keeps of the transfer setup ---------------------------------------------------------


@dataclass(frozen=True)
class TransferSetup:
    """The backbone file a fit trains on (its bytes) and the public ids it saw."""

    blob: bytes
    public_ids: np.ndarray

    @classmethod
    def bind(cls, config, backbone: str | bytes | None):
        """``(config naming the backbone by SHA-256, setup)``, or ``(config, None)`` without one.

        ``backbone`` is a path or the bytes of a backbone file."""
        if backbone is None:
            if config.training.backbone is not None:
                raise ValueError(
                    f"The config names the backbone {config.training.backbone[:16]}... but no "
                    "backbone file was given. Pass SISAEnsemble(backbone=FILE) or --backbone FILE."
                )
            return config, None
        where = "the backbone" if isinstance(backbone, bytes) else str(backbone)
        if isinstance(backbone, bytes):
            blob = backbone
        else:
            with open(backbone, "rb") as fh:
                blob = fh.read()
        bb = load_backbone(blob, where)
        if config.training.backbone not in (None, bb.sha256):
            raise ValueError(
                f"The config names the backbone {config.training.backbone}, but {where} has "
                f"SHA-256 {bb.sha256}. Give the backbone the store was trained with."
            )
        training = dataclasses.replace(config.training, backbone=bb.sha256)
        return dataclasses.replace(config, training=training), cls(blob, bb.public_ids)

    def write(self, store) -> None:
        """Keep the backbone and the public ids in the store, beside the shards."""
        store.write_bytes(BACKBONE_FILE, self.blob)
        store.write_table(PUBLIC_IDS_FILE, public_ids_table(self.public_ids))

    def refuse_sharded_public(self, store, jobs) -> None:
        """Refuse shards (the jobs of this fit) holding public ids: public data is never
        sharded, so none of it could ever be deleted."""
        for job in jobs:
            refuse_public(self.public_ids, job.shard_ids(store), "the training set")


def read_public_ids(store) -> np.ndarray:
    """The public ids a store's backbone was trained on."""
    return store.read_table(PUBLIC_IDS_FILE).column("id").to_numpy().astype(np.int64)


def refuse_public_request(store, config, ids: np.ndarray) -> None:
    """Refuse a deletion request naming public ids of the store's backbone (if it has one)."""
    if config.training.backbone is not None:
        refuse_public(read_public_ids(store), ids, "the deletion request")
