"""``sisa-ray pretrain``: a frozen backbone from data declared public.

The public data is a Parquet file (all of its rows are public), or a held-out part of a built-in
training set (``--public N``): those samples are never sharded, and ``sisa-ray train --backbone``
leaves them out of the training set. The backbone file records their ids.
"""

from __future__ import annotations

import hashlib
import sys
import time

from ..core.config import MODELS, TrainingConfig
from ..transfer import AUGMENTATIONS
from .common import CLIError, _emit


def cmd_pretrain(args) -> int:
    from ..datasets import load_dataset
    from ..transfer import load_backbone, pretrain, public_split

    train, _ = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                            n_classes=args.n_classes)
    if args.dataset.startswith("parquet:"):
        if args.public is not None:
            raise CLIError("--public N holds out part of a built-in dataset; every row of a "
                           "Parquet file given with --dataset parquet:PATH is public. Drop --public.")
        public = train
    else:
        if args.public is None:
            raise CLIError(f"--public N is required with --dataset {args.dataset}: the number of "
                           "training samples held out as public (they are never sharded).")
        public, _ = public_split(train, args.public, seed=args.public_seed)
    training = TrainingConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, hidden=args.hidden, threads=args.threads)
    if not args.json and not args.quiet:
        print(f"Pretraining {args.model} on {len(public)} public samples of {train.name}",
              file=sys.stderr)
    t0 = time.perf_counter()
    blob = pretrain(public, training, seed=args.seed)
    wall = time.perf_counter() - t0
    with open(args.out, "wb") as fh:
        fh.write(blob)
    bb = load_backbone(blob, args.out)
    payload = {"backbone": args.out, "sha256": hashlib.sha256(blob).hexdigest(),
               "arch": bb.arch, "n_public": len(public), "wall_seconds": wall}
    _emit(args, payload, f"Backbone {args.out} ({bb.arch}, {len(public)} public samples, "
                         f"{wall:.1f}s), SHA-256 {payload['sha256']}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="train a frozen backbone on public data")
    p.add_argument("--dataset", default="digits",
                   help="digits | fashion-mnist | mnist | cifar10 (with --public N) | "
                        "parquet:PATH (every row public)")
    p.add_argument("--public", type=int, default=None,
                   help="hold out this many samples of a built-in training set as public")
    p.add_argument("--public-seed", type=int, default=0,
                   help="which samples are held out (a keyed hash of their ids)")
    p.add_argument("--out", required=True, help="backbone file to write")
    p.add_argument("--data-dir", default=None, help="where local dataset files are")
    p.add_argument("--download", action="store_true", help="allow torchvision to download")
    p.add_argument("--model", default="cnn", choices=list(MODELS), help="backbone architecture")
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--hidden", type=int, default=128, help="width of the backbone's last layer")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--augment", choices=list(AUGMENTATIONS), default="none",
                   help="random shifts of up to 2 pixels (shift), and left-right mirroring "
                        "(shift-flip: for clothes and objects, not digits)")
    p.add_argument("--seed", type=int, default=0, help="seed of the backbone's training")
    p.add_argument("--n-classes", type=int, default=None, help="classes of Parquet data")
    have = p._option_string_actions
    if "--json" not in have:
        p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    if "--quiet" not in have:
        p.add_argument("--quiet", action="store_true", help="no status lines")
    p.set_defaults(func=cmd_pretrain)


# -- what `sisa-ray train` takes from this module: --backbone and the deletion-aware placement ----


def add_train_options(p) -> None:
    """The options of ``sisa-ray train`` for a frozen backbone and a deletion-aware placement."""
    p.add_argument("--backbone", default=None,
                   help="frozen backbone file (from `sisa-ray pretrain`, or torch.save of a "
                        "model zoo architecture and its state dict); each shard trains an mlp "
                        "head on its features. Its SHA-256 is part of the config")
    p.add_argument("--placement", choices=["hash", "prior", "group"], default="hash",
                   help="hash: shard by a keyed hash of the id; prior: samples whose "
                        "'deletion_prior' column is >= --hot-prior go to the first --hot-shards "
                        "shards; group: a 'group' column's samples share a shard (parquet data)")
    p.add_argument("--hot-shards", type=int, default=1,
                   help="shards that hold the samples likely to be deleted (--placement prior)")
    p.add_argument("--hot-prior", type=float, default=0.5,
                   help="deletion probability from which a sample is hot (--placement prior)")


def train_inputs(args, train, config):
    """``(train, config)`` for ``sisa-ray train``: a built-in training set less the public ids
    of ``--backbone``, and a sharding with the placement that ``--placement`` asks for."""
    import dataclasses

    import numpy as np

    from ..core.data import SampleSet

    if args.backbone is not None and isinstance(train, SampleSet) \
            and not args.dataset.startswith("parquet:"):
        from ..transfer import load_backbone

        with open(args.backbone, "rb") as fh:
            public = load_backbone(fh.read(), args.backbone).public_ids
        held_out = int(np.isin(train.ids, public).sum())
        train = train.without_ids(public)
        if held_out and not args.json and not args.quiet:
            print(f"{held_out} public samples of {args.dataset} (the backbone's) are not sharded",
                  file=sys.stderr)
    if args.placement == "hash":
        if (args.hot_shards, args.hot_prior) != (1, 0.5):
            raise CLIError("--hot-shards and --hot-prior apply to --placement prior.")
        return train, config
    sharding = dataclasses.replace(config.sharding, placement=args.placement,
                                   hot_shards=args.hot_shards, hot_prior=args.hot_prior)
    if not args.dataset.startswith("parquet:"):
        raise CLIError(f"--placement {args.placement} reads a "
                       f"'{_COLUMN[args.placement]}' column: give --dataset parquet:PATH.")
    import pyarrow.parquet as pq

    from ..core.plan import with_placement
    from ..datasets import read_parquet

    path = args.dataset[len("parquet:"):]
    column = _COLUMN[args.placement]
    table = pq.read_table(path)
    if column not in table.column_names:
        raise CLIError(f"--placement {args.placement} needs a '{column}' column in {path}; it "
                       f"has {table.column_names}. Add it, or use --placement hash.")
    if not isinstance(train, SampleSet):  # a deletion-aware placement needs the ids in memory
        train = read_parquet(path, args.n_classes)
    ids = table.column("id").to_numpy()
    values = table.column(column).to_numpy()
    pos = np.argsort(ids)
    values = values[pos[np.searchsorted(ids[pos], train.ids)]]
    sharding = with_placement(sharding, train.ids, values)
    return train, dataclasses.replace(config, sharding=sharding)


_COLUMN = {"prior": "deletion_prior", "group": "group"}
