"""The run's settings: the ConfigDict (configs/*.py + --config.KEY=VALUE) read once, here, into typed values.

`settings(cfg)` builds one frozen dataclass per room of the library (Model, Mesh, Data, Basin, Extract, Split,
Train, Merge, Export, Evaluate, Plan), and `validate(cfg)` checks all of them before any compute. Only this
module, main.py and the stage drivers (merit_jax/stages/) read the ConfigDict; the library takes the one
dataclass (or the few values) it needs. This module imports no library code: every room may import it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
from jax.sharding import Mesh

from merit_jax.errors import ConfigError, regex_errors
from merit_jax.sharding import make_mesh

CHOICES = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn", "splash"),
    "model.scan_layers": (False, True),
    "model.model_type": ("qwen2", "qwen2_5_vl"),
    "data.truncation": ("left", "right", "skip"),
    "extract.reduction": ("full", "stride", "sketch"),
    "extract.per_example": ("mean", "unit", "tokens"),
    "extract.gradients": ("auto", "per_example", "batched"),
    "split.method": ("merit", "random", "conflict", "none"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("cosine", "linear", "constant"),
    "merge.method": ("tokens", "uniform", "weights", "task_arithmetic", "ties", "dare"),
    "export.dtype": ("float32", "bfloat16", "float16"),
}
POSITIVE = ("data.max_len", "extract.n_calib", "extract.micro_chunk", "extract.dim", "extract.stride",
            "train.batch_size", "train.seq_len", "train.grad_accum", "train.learning_rate", "train.epochs",
            "train.keep_checkpoints", "train.log_every")
BASELINES = ("joint", "joint2", "random", "conflict", "uniform")

OPTIMIZERS = CHOICES["train.optimizer"]
SCHEDULES = CHOICES["train.schedule"]
DTYPES = ("float32", "bfloat16", "float16")
REMAT = CHOICES["model.remat"]
# Parameters without weight decay unless train.no_decay says otherwise: biases, norm scales, embeddings.
DEFAULT_NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embed_tokens/embedding$")
REDUCTIONS = CHOICES["extract.reduction"]
PER_EXAMPLE = CHOICES["extract.per_example"]
GRADIENT_PATHS = CHOICES["extract.gradients"]
SPLIT_METHODS = CHOICES["split.method"]


# ------------------------------------------------------------------------------------------ the rooms' types


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    hf_path: str = ""  # a Hugging Face directory (config.json, weights); "" = a random tiny model (basin)
    model_type: str = "qwen2"  # family of the random tiny model: qwen2 | qwen2_5_vl
    tiny: dict = dataclasses.field(default_factory=dict)  # Qwen2Config fields of the random tiny model
    tiny_vl: dict = dataclasses.field(default_factory=dict)  # the same for a tiny Qwen2.5-VL
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    scan_layers: bool = False
    max_segments: int = 16
    logits_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int = 1
    fsdp: int = -1
    tp: int = 1

    def mesh(self) -> Mesh:
        """The (data, fsdp, tp) mesh over all global devices, or a ConfigError saying why not."""
        try:
            return make_mesh(int(self.data), int(self.fsdp), int(self.tp))
        except ValueError as e:
            raise ConfigError(f"config mesh (data={self.data}, fsdp={self.fsdp}, tp={self.tp}) does not fit the "
                              f"{jax.device_count()} {jax.default_backend()} device(s) of {jax.process_count()} "
                              f"process(es): {e}") from None


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """data.* and what the data layer needs from other sections (the model's directory and family, the
    calibration draw)."""

    path: str = ""
    tasks: tuple = ()  # ({"name": ..., "path": ...}, ...)
    tokenizer: str = ""
    image_root: str = ""
    image_min_pixels: int = 0
    image_max_pixels: int = 0
    max_image_pixels: int = 0  # 0: the data layer's default
    max_len: int = 128
    truncation: str = "left"
    heldout_fraction: float = 0.1
    heldout_max: int = 64
    seed: int = 0
    synthetic: dict = dataclasses.field(default_factory=dict)  # the shipped mixture's generator settings
    model_path: str = ""  # model.hf_path: tokenizer and image processor fall back to it
    model_type: str = "qwen2"  # model.model_type: the family of a random start
    n_calib: int = 200  # extract.n_calib: calibration examples drawn per task
    stability_reference: int = 0  # extract.stability_reference: reference examples drawn per task


@dataclasses.dataclass(frozen=True)
class BasinSettings:
    enabled: bool = True
    steps: int = 150
    learning_rate: float | None = None  # None: train.learning_rate
    # None: as train.* (freeze: nothing frozen from a random start, whose vision tower must learn)
    warmup_steps: int | None = None
    batch_size: int | None = None
    schedule: str | None = None
    freeze: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    reduction: str = "sketch"  # full | stride | sketch: of the task's mean gradient
    per_example: str = "mean"  # mean | unit | tokens: how examples weigh in the task's mean
    dim: int = 4096  # d of `sketch` (and of the per-example sketches when reduction is full)
    stride: int = 7  # s of `stride`
    seed: int = 0  # of the sketch's hash
    micro_chunk: int = 16  # examples per vmap(grad) step (global, over all data shards)
    keep_example_sketches: bool = True
    logits_chunk: int = 0  # extract.logits_chunk (or model's): logits this many positions at a time (0: all)
    gradients: str = "auto"  # auto | per_example | batched (see `batched`)
    pack: bool = False  # batched path: several examples per row, kept apart by segment ids (see `packed`)

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"extract.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.per_example not in PER_EXAMPLE:
            raise ValueError(f"extract.per_example must be one of {PER_EXAMPLE}, got {self.per_example!r}")
        if isinstance(self.micro_chunk, bool) or int(self.micro_chunk) != self.micro_chunk or self.micro_chunk < 1:
            raise ValueError(f"extract.micro_chunk must be an integer >= 1, got {self.micro_chunk!r}")
        if self.gradients not in GRADIENT_PATHS:
            raise ValueError(f"extract.gradients must be one of {GRADIENT_PATHS}, got {self.gradients!r}")
        if self.gradients == "batched" and (self.per_example == "unit" or self.keep_example_sketches):
            raise ValueError("extract.gradients=batched gives no per-example gradients: it needs "
                             "extract.per_example=mean|tokens and extract.keep_example_sketches=False")
        if self.pack and not self.batched:
            raise ValueError("extract.pack=True packs the batched path's rows, and these options take the "
                             "per-example path: it needs extract.gradients=auto|batched, extract.per_example="
                             "mean|tokens and extract.keep_example_sketches=False")

    @property
    def packed(self) -> bool:
        """The batched path with several examples per row (first fit into the task's sequence bucket), as
        training packs them: each token weighs w_e / n_e (its example's weight over its supervised tokens),
        so the gradient is the same weighted mean with the padding's compute gone."""
        return self.pack and self.batched

    @property
    def batched(self) -> bool:
        """One gradient of the weighted loss per micro-chunk instead of per-example gradients. The task's mean
        (weights 1 or supervised tokens) is linear in the examples, so both give the same vector; only `unit`
        weights, per-example norms and per-example sketches (the stability curve) need per-example values.
        `auto` takes the batched path whenever nothing per-example is asked for."""
        if self.gradients == "auto":
            return self.per_example != "unit" and not self.keep_example_sketches
        return self.gradients == "batched"

    @property
    def example_reduction(self) -> str:
        """Per-example gradients are never kept whole: with reduction=full they are sketched."""
        return "sketch" if self.reduction == "full" else self.reduction


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    """extract.*: the task function's options plus what the stage selects and records."""

    options: ExtractOptions = ExtractOptions()
    n_calib: int = 200
    include: tuple[str, ...] = (".*",)
    exclude: tuple[str, ...] = ()
    stability_sizes: tuple[int, ...] = (10, 25, 50, 100, 200)
    stability_draws: int = 20
    stability_reference: int = 0
    xla_options: tuple[tuple[str, Any], ...] = ()  # per-jit XLA compiler options of the task function
    remat: str = ""  # the extraction's model.remat ("": model.remat): its micro-chunks are smaller than a step


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    method: str = "merit"  # merit | random | conflict | none
    depth: int = 1
    seed: int = 0
    axes: str = "global"  # global | local
    center: bool = True
    restarts: int = 16

    @property
    def num_groups(self) -> int:
        return 1 if self.method == "none" else 2 ** int(self.depth)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """train.* (and the dtype / remat / attention keys of model.*) as one validated value."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine / linear decay end at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY  # regexes over parameter names
    freeze: tuple[str, ...] = ()  # regexes over parameter names: these get no update (e.g. "^visual/")
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # global norm; 0 disables
    epochs: float = 1.0
    batch_size: int = 16  # sequences per step, global
    batch_tokens: int = 0  # > 0: global batch in tokens (batch_size = batch_tokens / seq_len)
    seq_len: int = 128
    grad_accum: int = 1
    checkpoint_every: int = 50  # steps; 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0: only at the end
    eval_batch_size: int = 0  # rows per eval step, global; 0: batch_size
    log_every: int = 10
    loader_threads: int = 1  # threads building batches (VL: image decoding and preprocessing)
    seed: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    scan_layers: bool = False  # model.scan_layers: decoder (and vision) blocks as one lax.scan
    max_segments: int = 16  # model.max_segments: segments per packed row model.attention=cudnn tells apart
    logits_chunk: int = 0  # model.logits_chunk: positions per logits chunk in the loss (0: all at once)
    xla_options: tuple[tuple[str, Any], ...] = ()  # per-jit XLA options of the train / eval steps

    def validate(self, mesh: Mesh | None = None) -> None:
        errors = []
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"train.optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            errors.append(f"train.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in DTYPES:
                errors.append(f"model.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
        if not isinstance(self.scan_layers, bool):
            errors.append(f"model.scan_layers={self.scan_layers!r}: expected True or False")
        if self.remat not in REMAT:
            errors.append(f"model.remat={self.remat!r}: expected one of {REMAT}")
        if not isinstance(self.max_segments, int) or self.max_segments < 2:
            errors.append(f"model.max_segments={self.max_segments!r}: expected an integer >= 2 (a row's examples "
                          "and its padding)")
        if not self.learning_rate > 0:
            errors.append(f"train.learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append(f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not self.epochs > 0:
            errors.append(f"train.epochs={self.epochs} must be > 0")
        for key in ("warmup_steps", "checkpoint_every", "eval_every", "eval_batch_size", "grad_clip",
                    "weight_decay", "batch_tokens", "logits_chunk"):
            if getattr(self, key) < 0:
                errors.append(f"train.{key}={getattr(self, key)} must be >= 0")
        for key in ("batch_size", "seq_len", "grad_accum", "keep_checkpoints", "log_every", "loader_threads"):
            if getattr(self, key) < 1:
                errors.append(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("no_decay", "freeze"):
            errors += regex_errors(f"train.{key}", getattr(self, key))
        if mesh is not None and self.batch_size >= 1 and self.grad_accum >= 1:
            dp = mesh.shape["data"] * mesh.shape["fsdp"]
            if self.batch_size % (dp * self.grad_accum):
                errors.append(
                    f"train.batch_size={self.batch_size} is not divisible by the data-parallel axes times the "
                    f"micro-batches: mesh.data*mesh.fsdp*train.grad_accum = {mesh.shape['data']}*"
                    f"{mesh.shape['fsdp']}*{self.grad_accum} = {dp * self.grad_accum} (every device needs the "
                    "same number of rows in every micro-batch)")
            if self.eval_batch_size and self.eval_batch_size % dp:
                errors.append(f"train.eval_batch_size={self.eval_batch_size} is not divisible by "
                              f"mesh.data*mesh.fsdp = {dp}")
        platform = mesh.devices.flat[0].platform if mesh is not None else None
        if self.attention == "cudnn" and platform not in (None, "gpu", "cuda"):
            errors.append(f"model.attention=cudnn is cuDNN's kernel for NVIDIA GPUs, and this run's devices are "
                          f"{platform}: use xla (or splash on TPU)")
        if errors:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


@dataclasses.dataclass(frozen=True)
class MergeSettings:
    method: str = "tokens"  # tokens | uniform | weights | task_arithmetic | ties | dare
    weights: tuple[float, ...] = ()
    dtype: str = ""  # "" keeps the inputs' dtype
    base: str = ""  # θ⁰ for task vectors ("" = the run's θ⁰)
    lam: float = 1.0
    density: float = 0.2
    drop_p: float = 0.9
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    baselines: tuple[str, ...] = ()
    batch_size: int = 32
    max_new_tokens: int = 16
    noise_sigmas: tuple[float, ...] = (0.01, 0.05, 0.1)
    noise_draws: int = 2
    lmc_points: int = 5
    hessian_alignment: bool = True
    hessian_k: int = 10
    hessian_examples: int = 64
    hessian_max_bytes: int = 4 << 30


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    tokens: int = 0
    tasks: int = 0
    example_tokens: int = 0  # mean tokens of a calibration example (extract.pack sizes its rows by it); 0: a bucket


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every room's settings; only main.py and the stage drivers hold it whole."""

    seed: int
    workdir: str
    model: ModelSettings
    mesh: MeshSettings
    data: DataSettings
    basin: BasinSettings
    extract: ExtractSettings
    split: SplitSettings
    train: TrainSettings
    merge: MergeSettings
    export: ExportSettings
    evaluate: EvaluateSettings
    plan: PlanSettings


# ------------------------------------------------------------------------------------- from the ConfigDict


def _section(cfg, name: str) -> dict:
    node = cfg.get(name, None) if hasattr(cfg, "get") else getattr(cfg, name, None)
    if node is None:
        return {}
    return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def _pick(cls, values: dict, **extra) -> Any:
    """cls(**the keys of `values` that are fields of cls, plus `extra`); absent keys keep the defaults."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in values.items() if k in fields and v is not None}
    kept.update({k: v for k, v in extra.items() if v is not None})
    return cls(**kept)


def model_settings(cfg) -> ModelSettings:
    m = _section(cfg, "model")
    return _pick(ModelSettings, m, tiny=dict(m.get("tiny") or {}), tiny_vl=dict(m.get("tiny_vl") or {}),
                 logits_chunk=int(m.get("logits_chunk", 0) or 0))


def mesh_settings(cfg) -> MeshSettings:
    return _pick(MeshSettings, _section(cfg, "mesh"))


def mesh_for(cfg) -> Mesh:
    """The (data, fsdp, tp) mesh of cfg.mesh over all global devices, or a ConfigError saying why not."""
    return mesh_settings(cfg).mesh()


def data_settings(cfg) -> DataSettings:
    d, m, e = _section(cfg, "data"), _section(cfg, "model"), _section(cfg, "extract")
    return _pick(DataSettings, d, tasks=tuple(dict(t) for t in d.get("tasks", ()) or ()),
                 synthetic=dict(d.get("synthetic") or {}), model_path=m.get("hf_path", ""),
                 model_type=m.get("model_type", "qwen2"), n_calib=int(e.get("n_calib", 200)),
                 stability_reference=int(e.get("stability_reference", 0)))


def basin_settings(cfg) -> BasinSettings:
    b = _section(cfg, "basin")
    return _pick(BasinSettings, b, freeze=None if b.get("freeze") is None else tuple(b["freeze"]))


def extract_options(cfg) -> ExtractOptions:
    e, m = _section(cfg, "extract"), _section(cfg, "model")
    return ExtractOptions(reduction=e["reduction"], per_example=e["per_example"], dim=int(e["dim"]),
                          stride=int(e["stride"]), seed=int(e.get("seed", cfg.get("seed", 0))),
                          micro_chunk=int(e["micro_chunk"]), keep_example_sketches=bool(e["keep_example_sketches"]),
                          logits_chunk=extract_logits_chunk(e, m), gradients=e.get("gradients", "auto"),
                          pack=bool(e.get("pack", False)))


def extract_logits_chunk(e, m) -> int:
    """extract.logits_chunk, or model.logits_chunk where it is -1 (or absent): the extraction's own, since its
    micro-chunks may hold the logits of whole rows, and chunks are rematerialised (a second logits forward)."""
    own = int(e.get("logits_chunk", -1))
    return int(m.get("logits_chunk", 0) or 0) if own == -1 else own


def extract_settings(cfg) -> ExtractSettings:
    e = _section(cfg, "extract")
    return _pick(ExtractSettings, e, options=extract_options(cfg), include=tuple(e.get("include", (".*",))),
                 exclude=tuple(e.get("exclude", ())),
                 xla_options=tuple(sorted(dict(e.get("xla_options") or {}).items())),
                 stability_sizes=tuple(int(x) for x in e.get("stability_sizes", (10, 25, 50, 100, 200))))


def split_settings(cfg) -> SplitSettings:
    s = _section(cfg, "split")
    method = str(s.get("method", "merit"))
    if method not in SPLIT_METHODS:
        raise ValueError(f"split.method must be one of {SPLIT_METHODS}, got {method!r}")
    return _pick(SplitSettings, s, method=method, depth=0 if method == "none" else s.get("depth", 1))


def train_settings(cfg, **overrides) -> TrainSettings:
    """train.* (+ the dtype, remat, attention and logits_chunk keys of model.*), `overrides` replacing keys."""
    t, m = cfg.train, cfg.model
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: t.get(k) for k in fields if t.get(k, None) is not None}
    for key in ("param_dtype", "compute_dtype", "remat", "attention", "scan_layers", "max_segments", "logits_chunk"):
        if m.get(key, None) is not None:
            values[key] = m.get(key)
    values.setdefault("seed", cfg.get("seed", 0))
    for key in ("no_decay", "freeze"):
        if key in values:
            values[key] = tuple(values[key])
    if "xla_options" in values:
        values["xla_options"] = tuple(sorted(dict(values["xla_options"]).items()))
    values.update(overrides)
    s = TrainSettings(**values)
    if s.batch_tokens:
        if s.batch_tokens % s.seq_len:
            raise ConfigError(f"train.batch_tokens={s.batch_tokens} is not a multiple of "
                              f"train.seq_len={s.seq_len}")
        s = dataclasses.replace(s, batch_size=s.batch_tokens // s.seq_len)
    return s


def merge_settings(cfg) -> MergeSettings:
    g = _section(cfg, "merge")
    return _pick(MergeSettings, g, weights=tuple(float(w) for w in g.get("weights", ()) or ()),
                 seed=int(g.get("seed", cfg.get("seed", 0))))


def export_settings(cfg) -> ExportSettings:
    return _pick(ExportSettings, _section(cfg, "export"))


def evaluate_settings(cfg) -> EvaluateSettings:
    v = _section(cfg, "evaluate")
    return _pick(EvaluateSettings, v, baselines=tuple(v.get("baselines", ())),
                 noise_sigmas=tuple(float(x) for x in v.get("noise_sigmas", (0.01, 0.05, 0.1))))


def plan_settings(cfg) -> PlanSettings:
    return _pick(PlanSettings, _section(cfg, "plan"))


def settings(cfg) -> Settings:
    """Every room's settings from the ConfigDict (run `validate` first for errors that name every bad key)."""
    return Settings(seed=int(cfg.get("seed", 0)), workdir=str(cfg.get("workdir", "") or ""), model=model_settings(cfg), mesh=mesh_settings(cfg),
                    data=data_settings(cfg), basin=basin_settings(cfg), extract=extract_settings(cfg),
                    split=split_settings(cfg), train=train_settings(cfg), merge=merge_settings(cfg),
                    export=export_settings(cfg), evaluate=evaluate_settings(cfg), plan=plan_settings(cfg))


# ------------------------------------------------------------------------------------------- validation


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            raise ValueError(f"config: missing key {dotted!r}")
        node = node[part]
    return node


def num_groups(cfg) -> int:
    return 1 if cfg.split.method == "none" else 2 ** int(cfg.split.depth)


def validate(cfg, stage: str = "all", branch: int | None = None) -> None:
    """Raises ValueError naming the key for anything that would fail later (before any compute)."""
    errors = []
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            errors.append(f"{key}={value!r}: expected one of {', '.join(choices)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(f"{key}={value!r}: must be a positive number")
    if cfg.data.max_len > cfg.train.seq_len:
        errors.append(f"data.max_len={cfg.data.max_len} exceeds train.seq_len={cfg.train.seq_len}: "
                      "an example must fit in one packed row")
    if not 0 <= cfg.data.heldout_fraction < 1:
        errors.append(f"data.heldout_fraction={cfg.data.heldout_fraction}: must be in [0, 1)")
    if cfg.split.method != "none" and not 1 <= cfg.split.depth <= 10:
        errors.append(f"split.depth={cfg.split.depth}: must be 1..10 for split.method={cfg.split.method!r}")
    e = cfg.extract
    if e.gradients == "batched" and (e.per_example == "unit" or e.keep_example_sketches):
        errors.append("extract.gradients='batched' gives no per-example gradients: it needs extract.per_example="
                      "mean|tokens and extract.keep_example_sketches=False")
    chunk = e.get("logits_chunk", -1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < -1:
        errors.append(f"extract.logits_chunk={e.get('logits_chunk')}: -1 (model.logits_chunk), 0 (all positions "
                      "at once) or a positive count of positions")
    if e.get("remat", "") not in ("", *REMAT):
        errors.append(f"extract.remat={e.get('remat')!r}: expected '' (model.remat) or one of {REMAT}")
    if e.get("pack", False) and (e.gradients == "per_example" or e.per_example == "unit" or e.keep_example_sketches):
        errors.append("extract.pack=True packs the batched path's rows: it needs extract.gradients=auto|batched, "
                      "extract.per_example=mean|tokens and extract.keep_example_sketches=False")
    for key in ("extract.include", "extract.exclude"):
        errors += regex_errors(key, _get(cfg, key))
    if cfg.merge.method == "weights" and not list(cfg.merge.weights):
        errors.append("merge.method='weights' needs merge.weights")
    bad = [b for b in cfg.evaluate.baselines if b not in BASELINES]
    if bad:
        errors.append(f"evaluate.baselines: unknown {bad}; expected a subset of {', '.join(BASELINES)}")
    if cfg.model.hf_path and not (pathlib.Path(cfg.model.hf_path) / "config.json").is_file():
        errors.append(f"model.hf_path={cfg.model.hf_path!r}: no config.json there")
    if not cfg.model.hf_path and not cfg.basin.enabled:
        errors.append("model.hf_path is empty and basin.enabled is False: there is no θ⁰")
    if cfg.data.path and not pathlib.Path(cfg.data.path).exists():
        errors.append(f"data.path={cfg.data.path!r} does not exist")
    errors += _mesh_errors(cfg)
    if branch is not None:
        if stage != "train":
            errors.append(f"--branch is only meaningful with --stage train (got --stage {stage})")
        elif not 0 <= branch < num_groups(cfg):
            errors.append(f"--branch {branch} is out of range: the split has {num_groups(cfg)} group(s)")
    if errors:
        raise ValueError("; ".join(errors))


def _mesh_errors(cfg) -> list[str]:
    """The trainer's own checks (mesh vs devices, batch vs data axes, grad_accum, batch_tokens), run early."""
    try:
        train_settings(cfg).validate(mesh_for(cfg))
    except ValueError as e:
        return [str(e)]
    return []
