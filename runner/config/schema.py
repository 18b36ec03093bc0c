"""The experiment's schema: typed dataclasses, their defaults, and which fields make a run's identity.

One YAML format serves single runs and sweeps (`runner.config.loading` reads it):

    name: lil_gatsby
    include: base.yaml            # optional: another experiment file used as base
    corpus: {...}  model: {...}  train: {...}  record: {...}  resources: {...}
    grid:                         # optional: dotted key -> list of values; runs = cartesian product
      train.seed: {range: [0, 8]}
      train.precision: [bf16-true, bf16-mixed]

The values a field may hold beyond its type are `runner.config.rules`'. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

RECORDED_TENSORS = ("W", "grads", "momentum", "variance", "logits", "loss")


# Which fields make a run's identity (its run id), declared on the fields themselves:
# - NOT_IDENTITY: never part of it (where things are or how they are scheduled, not what is computed);
# - introduced_with(default): a key added after runs existed; part of the identity only when it holds
#   another value, so adding it leaves the run ids of every existing experiment unchanged.
NOT_IDENTITY = {"identity": False}


def introduced_with(default: Any) -> dict:
    return {"introduced_with": default}


def identity(config: Any) -> dict:
    """The fields of a config dataclass (recursively) that determine a run's results."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("identity", True):
            continue
        if "introduced_with" in f.metadata and value == f.metadata["introduced_with"]:
            continue
        out[f.name] = identity(value) if is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class CorpusConfig:
    # the book as a local file; None: $LILGATSBY_CORPUS, data/ cache, download. Where the book is,
    # not what it is (its sha256 is in the manifest).
    path: str | None = field(default=None, metadata=NOT_IDENTITY)
    ascii: Literal["drop", "map"] = "drop"  # how non-ASCII characters become 7-bit ASCII


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128  # the ASCII tokenizer has exactly 128 tokens
    context_length: int = 128  # tokens per training window
    n_positions: int = 128  # GPT-2 position embeddings; >= context_length
    hidden_dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    # tie the input embedding to the unembedding (E = W, as in Qwen3-4B); false: E is its own
    # parameter, recorded beside W (docs/recording.md), the control for what the tie does
    tie_embeddings: bool = field(default=True, metadata=introduced_with(True))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 1.0e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    seed: int = 42
    precision: Literal["bf16-true", "bf16-mixed", "fp32"] = "bf16-true"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = None  # torch intra-op threads; None: the CPUs granted (Ray's, else affinity and cgroup quota)
    # steps between checkpoints (resume points after a crash, not results)
    checkpoint_every: int = field(default=1000, metadata=NOT_IDENTITY)
    # The notebook's 1.12a as it ran, one key per difference (experiments/notebook_1_12a.yaml sets all):
    # what is learned: next-token | token-after-next (already-shifted targets as labels=, shifted again by HF)
    targets: Literal["next-token", "token-after-next"] = field(
        default="next-token", metadata=introduced_with("next-token"))
    # which windows each step trains on: epochs (a permutation per epoch, the last partial batch dropped)
    # | notebook (its DataLoader's order, the last partial batch kept; row 0 from its dummy batch)
    batch_order: Literal["epochs", "notebook"] = field(default="epochs", metadata=introduced_with("epochs"))
    # fast (ours on the CPU, chosen per precision and device: runner/model/kernels.py, docs/speed.md)
    # | hf (transformers' own and torch's single-tensor Adam: the bits of recordings before round 2's
    # kernels) | notebook (HF's defaults: gelu_new, SDPA; the recorded mean logits reduced in the model's dtype)
    kernels: Literal["fast", "hf", "notebook"] = field(default="fast", metadata=introduced_with("fast"))
    # What large-model training runs with (docs/training.md, "Optimizer and schedule"):
    # adam | adamw: torch's AdamW, decay decoupled, on the 2-D matrices only (not biases, layer norms)
    optimizer: Literal["adam", "adamw"] = field(default="adam", metadata=introduced_with("adam"))
    weight_decay: float = field(default=0.0, metadata=introduced_with(0.0))  # adamw's; 0 with adam
    # constant | cosine (from lr down to min_lr at the last step), after `warmup_steps` of linear
    # warm-up from 0 (step s of the warm-up trains at lr * s / warmup_steps)
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata=introduced_with("constant"))
    warmup_steps: int = field(default=0, metadata=introduced_with(0))
    min_lr: float = field(default=0.0, metadata=introduced_with(0.0))
    # clip the global gradient norm (all parameters) to this before each update; null: no clipping
    grad_clip: float | None = field(default=None, metadata=introduced_with(None))

    @property
    def lr_varies(self) -> bool:
        """Whether the learning rate changes over the run (then each step's is recorded)."""
        return self.lr_schedule != "constant" or self.warmup_steps > 0

    def learning_rate(self, step: int) -> float:
        """The learning rate of update `step` (1..steps): lr * step / warmup_steps during the
        warm-up; then lr (constant) or min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p going from
        just above 0 after the warm-up to 1 at the last step (cosine). 0 at step 0: no update (as
        the recording's row 0 holds).

        It lives with the config, not with the optimizer, because `verify` and the metrics recompute
        each recorded step's rate from a recording's config alone, without importing torch."""
        if step == 0:
            return 0.0
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class RecordConfig:
    every: int = 1  # record steps 0, every, 2*every, ... <= steps
    tensors: tuple[str, ...] = RECORDED_TENSORS
    # whole-model snapshots (Hugging Face format) under models/step-<N>/: final | none | pythia | [steps]
    model_steps: Literal["final", "none", "pythia"] | tuple[int, ...] = field(
        default="final", metadata=introduced_with("final"))
    # the per-step metrics (metrics.csv.partial) and TensorBoard events written as the rows land;
    # false: metrics.csv is computed when the run ends. The same numbers either way.
    live: bool = field(default=True, metadata=NOT_IDENTITY)
    # full: every tensor of every step; compact: gradients, logits, loss and keyframes, W and Adam's
    # moments replayed from them (docs/recording.md). The same numbers either way.
    format: Literal["full", "compact"] = field(default="full", metadata=NOT_IDENTITY)

    @property
    def replayable(self) -> bool:
        """Whether the compact format can record this: every step, with what the replay is made of."""
        return self.every == 1 and {"W", "grads", "momentum", "variance"} <= set(self.tensors)


@dataclass(frozen=True)
class ResourcesConfig:
    """What one run asks Ray for: scheduling only, so not part of the run id."""

    cpus_per_run: float = 1.0
    gpus_per_run: float = 1.0  # used only when the cluster has GPUs; fractions share a GPU


@dataclass(frozen=True)
class Experiment:
    name: str
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata=NOT_IDENTITY)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_id(self) -> str:
        """Short stable hash of the fields that determine the run's results (see `identity`)."""
        blob = json.dumps(identity(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def non_identity_keys(cls: Any = Experiment, prefix: str = "") -> set[str]:
    """The dotted keys that never change what a run computes (marked NOT_IDENTITY, or in a section
    that is), e.g. corpus.path, resources.cpus_per_run."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        inner = hints[f.name]
        if not f.metadata.get("identity", True):
            names = [g.name for g in fields(inner)] if is_dataclass(inner) else None
            keys |= {f"{prefix}{f.name}.{n}" for n in names} if names else {f"{prefix}{f.name}"}
        elif is_dataclass(inner):
            keys |= non_identity_keys(inner, f"{prefix}{f.name}.")
    return keys


@dataclass(frozen=True)
class Run:
    """One point of an experiment's grid: the resolved config, the grid values that made it and the
    `--set` values applied to every point."""

    experiment: Experiment
    point: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.experiment.run_id

    @property
    def label(self) -> str:
        """The grid point as people read it: `train.seed=1 train.precision=fp32`."""
        return point_label(self.point) or "(base config)"

    @property
    def overrides(self) -> dict[str, Any]:
        """Every key this run sets on top of its experiment file: `--set` values, then the grid point."""
        return {**self.settings, **self.point}


def point_label(point: dict[str, Any]) -> str:
    """`train.seed=1 record.live=false`: values as they are written in YAML (and in `--set`)."""
    def written(value: Any) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return " ".join(f"{k}={written(v)}" for k, v in point.items())
