"""Typed, frozen run configurations: what an entry point runs with, built once in its `main`.

    from pnpp_tf.config import TrainConfig
    from pnpp_tf.train import train
    results = train(TrainConfig(dataset="cub", data_dir="/data/CUB_200_2011", model_dir="runs/cub"))

A field's `option(...)` is the only place an option is described: its default, its help, its
choices and its bounds. `pnpp_tf.flags` turns the fields into absl flags of the same names (the
command line and a --flagfile), and `__post_init__` checks the same bounds, so a config built in
Python is refused for the same reasons as a command line. Defaults are the paper's recipe for
CUB-200-2011. What a run was given is what its checkpoints record (`to_dict`) and what a resumed
run is compared with (`changed_fields`).
"""

import dataclasses
import types
import typing

from pnpp_tf.modeling import backbones
from pnpp_tf.artifacts.export_dir import FORMATS, TFLITE_VARIANTS
from pnpp_tf.retrieval import neighbours
from pnpp_tf.data import DATASETS
from pnpp_tf.data.image_check import ON_BAD_IMAGE
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.data.pipeline import SAMPLERS
from pnpp_tf.training.distribute import STRATEGIES
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.losses import VARIANTS
from pnpp_tf.modeling.model import POOLINGS, cls_of_a_feature_map


def option(default, help, *, choices=None, lower=None, upper=None, positive=False, parse=None, words=None):
    """A config field: its default and how the command line and the checks see it.

    Args:
        default: the value when none is given; a tuple for a list option.
        help: the flag's help text.
        choices: the allowed values (a flag of those choices), or a function returning them.
        lower, upper: inclusive bounds of a number (of each item, for a list).
        positive: the number must be greater than 0 (absl's bounds are inclusive).
        parse: for a list option, `(field name, list of values) -> tuple` converting and
            checking the items (default: as the annotation says, e.g. `tuple[int, ...]`).
        words: for a str option that is a count or a word ("auto"): the words; the value is
            one of them or the digits of an integer >= 0 (an int given in Python becomes those).
    """
    metadata = {"help": help, "choices": choices, "lower": lower, "upper": upper,
                "positive": positive, "parse": parse, "words": words}
    return dataclasses.field(default=default, metadata=metadata)


def positive_ints(name, values, sort=False):
    """The integers of a list option, each > 0 (sorted and distinct with `sort`).

    Raises:
        UserError: an item is not a positive integer.
    """
    try:
        ints = [int(value) for value in values]
    except (TypeError, ValueError) as error:
        raise UserError(f"--{name} must be positive integers, got {_joined(values)}.") from error
    if any(value < 1 for value in ints):
        raise UserError(f"--{name} must be positive integers, got {_joined(values)}.")
    return tuple(sorted(set(ints))) if sort else tuple(ints)


def _rates(name, values):
    """The rates of a list option, each strictly between 0 and 1.

    Raises:
        UserError: an item is not such a number.
    """
    try:
        rates = tuple(float(value) for value in values)
    except (TypeError, ValueError) as error:
        raise UserError(f"--{name} must be numbers between 0 and 1, got {_joined(values)}.") from error
    if not rates or any(not 0 < rate < 1 for rate in rates):
        raise UserError(f"--{name} must be numbers between 0 and 1, got {_joined(values)}.")
    return rates


class Config:
    """The checks and conversions every config shares; subclasses are frozen dataclasses."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = _converted(field, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
            _check(field, value)
        self.validate()

    def validate(self):
        """Checks between fields; raises `UserError`. Subclasses extend it."""

    def to_dict(self):
        """{field name: value}, JSON-able (tuples become lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def defaults(cls):
        """{field name: default}."""
        return {field.name: field.default for field in dataclasses.fields(cls)}


def changed_fields(earlier, now, defaults, ignored=()):
    """The names of the fields whose values differ between two recorded configs.

    Args:
        earlier: {name: value} an earlier run recorded (`to_dict()`).
        now: {name: value} of this run.
        defaults: {name: default}; a field the earlier run did not know ran with its default.
        ignored: fields that may differ.

    Returns:
        The sorted names.
    """
    names = (set(earlier) | set(now)) - set(ignored)
    return sorted(name for name in names if _plain(earlier.get(name, defaults.get(name))) != _plain(now.get(name)))


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """The data, where results go, and how evaluation reads images."""

    dataset: str = option("glyphs", "Dataset reader.", choices=DATASETS)
    data_dir: typing.Optional[str] = option(None, "Dataset directory (glyphs: rendered here on first use).")
    model_dir: typing.Optional[str] = option(None, "Where checkpoints, logs and results.json are written.")
    image_size: int = option(256, "Side of the square input images, in pixels.", lower=16)
    eval_ks: tuple[int, ...] = option(
        (), "The K of Recall@K; empty: the dataset's protocol (1,2,4,8 for CUB/Cars/folder/glyphs, "
        "1,10,100,1000 for SOP, 1,10,...,50 for In-Shop).", parse=lambda name, v: positive_ints(name, v, sort=True))
    eval_batch_size: int = option(64, "Images per inference batch.", lower=1)
    eval_distance: str = option("cosine", "Retrieval distance: cosine (on L2-normalised embeddings) or euclidean "
                                "(on the raw embeddings, the authors' protocol); NMI clusters the same vectors.",
                                choices=("cosine", "euclidean"))
    on_bad_image: str = option("error", "An image that does not decode: error (stop, naming it) or skip "
                               "(train without it; logged, counted in results.json).", choices=ON_BAD_IMAGE)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Largest width x height of an image read from the data; a "
                             "larger one counts as a bad image (see --on_bad_image). Read from the file header "
                             "before decoding, so one huge file cannot exhaust memory.", lower=1)


@dataclasses.dataclass(frozen=True)
class CacheConfig(Config):
    """The on-disk image cache (training only: evaluation reads each image once)."""

    cache_dir: str = option("", "Decode every image once into this directory (downsized to --cache_short_side) "
                            "and read the decoded pixels in every epoch: for datasets whose decoded images fit "
                            "on disk. Empty: decode the files every epoch.")
    cache_short_side: int = option(0, "Shorter side of the cached training images, in pixels (smaller images are "
                                   "kept as they are); 0: 288/256 of --image_size, the side evaluation resizes "
                                   "to. Evaluation images are always cached at that side.", lower=0)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The embedder and the loss."""

    backbone: str = option("resnet50", "Backbone trunk.", choices=backbones.available_backbones)
    backbone_preset: typing.Optional[str] = option(
        None, "--backbone=keras_hub: a KerasHub preset, as a Kaggle or hf:// handle (downloaded on first use) or "
        "a local preset directory written by save_to_preset (offline).")
    weights: str = option("imagenet", "Backbone weights: imagenet, none, or a weights file path. With "
                          "--backbone=keras_hub, imagenet (or preset) is the preset's own weights and none its "
                          "architecture with random weights.")
    embedding_dim: int = option(2048, "Embedding size.", lower=1)
    pooling: str = option("max", "Global pooling of the last feature map, or of a transformer's patch tokens "
                          "(never its CLS or register tokens); cls: a transformer's CLS token.", choices=POOLINGS)
    layer_norm: bool = option(True, "LayerNorm (no affine parameters) on the pooled features.")
    loss: str = option("proxynca_pp", "proxynca_pp, or the original proxynca.", choices=VARIANTS)
    temperature: float = option(1.0 / 9.0, "Softmax temperature of the loss.", positive=True)

    def validate(self):
        super().validate()
        spec = backbones.get_backbone(self.backbone)
        spec.check_preset(self.backbone_preset)
        if self.pooling == "cls" and not spec.takes_preset:
            raise cls_of_a_feature_map(f"--backbone={self.backbone}")


@dataclasses.dataclass(frozen=True)
class OptimizationConfig(Config):
    """The optimisation, its schedule and the compute."""

    mode: str = option("trainval", "trainval: all training classes, test on the test classes. train (stage 1): "
                       "first half of the training classes, validate on the second half, reduce the LR on "
                       "plateau and record the schedule in <model_dir>/schedule.json.", choices=("trainval", "train"))
    lr_drop_epochs: tuple[int, ...] = option((), "trainval: main epochs after which both LRs drop by --lr_decay.")
    lr_schedule_from: typing.Optional[str] = option(None, "trainval: a stage-1 model_dir whose schedule.json gives "
                                                    "--lr_drop_epochs and --epochs (its best epoch).")
    lr_decay: float = option(0.1, "LR multiplier at each drop (both stages).", positive=True)
    plateau_patience: int = option(4, "train: epochs without validation improvement before a drop.", lower=0)
    batch_size: int = option(32, "Images per batch.", lower=1)
    classes_per_batch: int = option(8, "Distinct classes per batch (class-balanced sampling).", lower=1)
    sampler: str = option("balanced", "balanced: classes_per_batch classes x equal images (ProxyNCA++); random: "
                          "batches without class structure (the ablation).", choices=SAMPLERS)
    epochs: int = option(40, "Training epochs after the warm-up.", lower=1)
    warmup_epochs: int = option(5, "Epochs training only the embedding layer and proxies.", lower=0)
    lr: float = option(4e-3, "Learning rate of the backbone and embedding layer.", positive=True)
    proxy_lr: float = option(4e2, "Learning rate of the proxies.", positive=True)
    clip_value: float = option(10.0, "Clip backbone and embedding gradients by value (0: off).", lower=0)
    flip: bool = option(True, "Random horizontal flips in training.")
    eval_every: str = option("auto", "Measure Recall@K on the test split every N epochs (0: only at the end); "
                             "auto: as often as evaluating stays within a tenth of the training time, judged by "
                             "the image counts (every epoch only when the test split is small beside the training "
                             "split; every 4 epochs on CUB and SOP). The final measurement is always made.",
                             words=("auto",))
    jit_compile: str = option("auto", "XLA for the train step; auto: on GPU only.", choices=("auto", "true", "false"))
    steps_per_execution: int = option(1, "Train steps per call of the compiled train function (Keras' "
                                      "steps_per_execution): fewer host round trips on a GPU or TPU, the same "
                                      "updates; per-batch callbacks see every N-th step.", lower=1)
    mixed_precision: str = option("none", "Keras dtype policy of the backbone; loss, proxies and logits stay "
                                  "float32, and float16 uses dynamic loss scaling.",
                                  choices=("none", "mixed_float16", "mixed_bfloat16"))
    strategy: str = option("default", "tf.distribute strategy: default (one device), mirrored (all local GPUs), "
                           "multi_worker (TF_CONFIG cluster), tpu.", choices=STRATEGIES)
    tpu: typing.Optional[str] = option(None, "--strategy=tpu: TPU name or grpc:// address (empty: local TPU VM).")
    sync_batch_norm: bool = option(True, "With several replicas, BatchNorm statistics over the whole global batch "
                                   "(as on one device) rather than per replica.")
    seed: int = option(0, "Seed of weights, sampling and augmentation.", lower=0)
    deterministic: bool = option(False, "Deterministic TensorFlow ops: two runs with the same --seed give "
                                 "identical weights (slower on GPU).")
    debug_numerics: bool = option(False, "Check every op for NaN/Inf and name the first that produces one "
                                  "(slow: for debugging).")
    keep_checkpoints: int = option(3, "Checkpoints kept in <model_dir>/checkpoints.", lower=1)
    accept_data_change: bool = option(False, "Resume although image files were added, removed or modified since "
                                      "the run was checkpointed (the classes must be the same); without it such "
                                      "a resume stops, naming the changes.")
    checkpoint_every_steps: int = option(0, "Also checkpoint every N steps within an epoch (0: at the end of each "
                                         "epoch only); a rerun resumes at that step.", lower=0)
    verbose: int = option(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.", lower=0, upper=2)


@dataclasses.dataclass(frozen=True)
class TrainConfig(OptimizationConfig, ModelConfig, CacheConfig, DataConfig):
    """Everything `pnpp_tf.train` runs with."""

    # Fields that change how a run is watched, stored or found, not what it computes: a run is
    # resumed, or recognised as finished, whatever their values.
    BOOKKEEPING = frozenset({"verbose", "debug_numerics", "keep_checkpoints", "checkpoint_every_steps",
                             "eval_batch_size", "eval_every", "steps_per_execution", "model_dir",
                             "data_dir", "accept_data_change"})

    def validate(self):
        super().validate()
        if not self.model_dir:
            raise UserError("--model_dir is required: checkpoints and results.json are written there.")
        if self.checkpoint_every_steps % self.steps_per_execution:
            raise UserError(f"--checkpoint_every_steps={self.checkpoint_every_steps} is not a multiple of "
                            f"--steps_per_execution={self.steps_per_execution}: checkpoints fall between executions.")
        if self.mode == "train" and (self.lr_drop_epochs or self.lr_schedule_from):
            raise UserError("--lr_drop_epochs and --lr_schedule_from are for --mode=trainval; "
                            "--mode=train finds the schedule itself.")

    def changed_from(self, recorded, allowed=()):
        """The fields in which this config computes something else than the `recorded` one.

        Where --cache_dir is does not count, whether there is one does; `BOOKKEEPING` fields do
        not count either.

        Args:
            recorded: an earlier run's `to_dict()` (older runs may lack newer fields).
            allowed: fields that may also differ (e.g. "epochs", to train a resumed run longer).

        Returns:
            The sorted names of the changed fields.
        """
        earlier, now = _as_recorded(type(self), recorded), self.to_dict()
        earlier["cache_dir"], now["cache_dir"] = bool(earlier.get("cache_dir")), bool(now["cache_dir"])
        return changed_fields(earlier, now, self.defaults(), ignored=self.BOOKKEEPING | set(allowed))


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(DataConfig):
    """What `pnpp_tf.evaluate` measures, on which data, and how."""

    saved_model: typing.Optional[str] = option(None, "Evaluate this SavedModel (or TF Serving base path) instead "
                                               "of <model_dir>/embedder.keras.")
    output_dir: typing.Optional[str] = option(None, "Where eval_<dataset>.json and .md go (default: --model_dir).")
    backend: str = option("exact", "Exact nearest-neighbour search: exact (TensorFlow), faiss (pip install "
                          "'pnpp_tf[faiss]'), or auto (faiss for large galleries when installed); the same "
                          "ranking and tie-break whichever.", choices=lambda: _BACKEND_CHOICES)
    nmi: str = option("auto", "Cluster with k-means and report NMI; auto: as the dataset's protocol says (CUB, "
                      "Cars, folder, glyphs).", choices=("auto", "true", "false"))
    block_size: int = option(0, "Query rows per block of the exact search (0: automatic, scores of at most "
                             "256 MB per block).", lower=0)
    verbose: int = option(1, "0: silent; 1: a progress bar while embedding.", lower=0, upper=1)
    calibrate: bool = option(False, "Also choose match thresholds (cosine): the true-accept rate of pairs at each "
                             "--false_accept_rates, the threshold of the best F1 of 'the nearest neighbour is a "
                             "match', and their ROC in roc_<dataset>.png.")
    false_accept_rates: tuple[float, ...] = option((1e-2, 1e-3, 1e-4), "With --calibrate: the false-accept rates "
                                                   "at which to report the true-accept rate.",
                                                   parse=lambda name, values: _rates(name, values))


@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """What `pnpp_tf.export` exports, where, and how it measures the exports."""

    model_dir: typing.Optional[str] = option(None, "Training run directory: embedder.keras, results.json.")
    export_dir: typing.Optional[str] = option(None, "Output directory (TF Serving's --model_base_path).")
    format: tuple[str, ...] = option(FORMATS, "What to export: any of saved_model, tflite, onnx (onnx needs "
                                     "pip install 'pnpp_tf[onnx]').")
    version: typing.Optional[int] = option(None, "Version to write (default: the next after those present).")
    dataset: typing.Optional[str] = option(None, "Override the run's dataset (default: results.json).",
                                           choices=DATASETS)
    data_dir: typing.Optional[str] = option(None, "Override the run's dataset directory (results.json).")
    tflite_variants: tuple[str, ...] = option(TFLITE_VARIANTS, "TFLite variants to convert.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Largest image (width x height) the bytes signature decodes.",
                             lower=1)
    representative_images: int = option(100, "Training images calibrating full_int8.")
    max_eval_images: int = option(0, "Compare on at most this many test images (0: all).")
    latency_images: int = option(50, "Single-image calls timed per variant.")
    eval_batch_size: int = option(64, "Images per batch for Keras and the SavedModel.")
    tflite_threads: typing.Optional[int] = option(None, "TFLite interpreter and ONNX Runtime threads (default: "
                                                  "all cores).")
    publish_on_parity_failure: bool = option(False, "Publish a version even if a variant fails the parity "
                                             "check (default: its report goes to parity/<version>.rejected.md "
                                             "and nothing else of it stays).")
    index: typing.Optional[str] = option(None, "Also serve searches of this index (python -m pnpp_tf.index, made "
                                         "with this model): the retrieve signatures of pnpp_tf.serving.retrieve.")
    retrieval_max_k: int = option(100, "Largest k the retrieve signatures answer (at most the index's size).",
                                  lower=1)
    retrieval_dtype: str = option("float32", "How the SavedModel holds the index: float32, or float16 (half "
                                  "the size, scores of the float16-rounded rows).", choices=("float32", "float16"))
    match_threshold: typing.Optional[float] = option(
        None, "Cosine similarity in [-1, 1] from which two images match, as pnpp_tf.evaluate --calibrate chose it: "
        "carried by the SavedModel (variable match_threshold), the ONNX metadata and the parity report.",
        lower=-1.0, upper=1.0)


@dataclasses.dataclass(frozen=True)
class CheckDataConfig(Config):
    """What `pnpp_tf.check_data` checks."""

    dataset: typing.Optional[str] = option(None, "Dataset reader.", choices=DATASETS)
    data_dir: typing.Optional[str] = option(None, "Dataset directory.")
    batch_size: int = option(32, "Training batch size (to find classes smaller than a batch's share).", lower=1)
    classes_per_batch: int = option(8, "Classes per batch.", lower=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Largest width x height of an image, as training's --max_pixels: "
                             "a larger one is reported, read from its header, undecoded.", lower=1)
    json: typing.Optional[str] = option(None, "Also write the report as JSON to this file.")

    def validate(self):
        if not self.dataset or not self.data_dir:
            raise UserError("--dataset and --data_dir are both required.")
        if self.batch_size % self.classes_per_batch:
            raise UserError(f"--batch_size={self.batch_size} is not divisible by "
                            f"--classes_per_batch={self.classes_per_batch}.")


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string", tuple: "a list"}


def _as_recorded(config_class, recorded):
    """A recorded config with its list fields in today's form: runs before the typed configs
    recorded them as absl gave them (["1", "2", "4", "8"] for --eval_ks=1,2,4,8)."""
    values = dict(recorded)
    for field in dataclasses.fields(config_class):
        if field.name in values and _origin(field.type) is tuple and values[field.name] is not None:
            try:
                values[field.name] = _plain(_converted(field, values[field.name]))
            except UserError:
                pass  # a value no run of today would record: it differs, and says so as it is
    return values


def _converted(field, value):
    """`value` in the field's type: list options become tuples, checked by their `parse`."""
    if field.metadata.get("words") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if _origin(field.type) is not tuple:
        return value
    if isinstance(value, str):
        value = [item for item in value.split(",") if item]
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse(field.name, value)
    item_type = typing.get_args(field.type)[0]
    if item_type is int:
        return _ints(field.name, value)
    return tuple(item_type(item) for item in value)


def _ints(name, values):
    try:
        return tuple(int(value) for value in values)
    except (TypeError, ValueError) as error:
        raise UserError(f"--{name} must be integers, got {_joined(values)}.") from error


def _check(field, value):
    """Raises `UserError` if `value` is not of the field's type or breaks its choices or bounds."""
    meta = field.metadata
    kind = base_type(field.type)
    # A float field takes an int; a bool is no int here, though Python says it is one.
    allowed = {float: (int, float), int: int, bool: bool, str: str, tuple: tuple}[kind]
    if value is not None and (not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))):
        raise UserError(f"--{field.name}={value!r}: must be {_KIND_NAMES[kind]}.")
    words = meta.get("words")
    if words and isinstance(value, str) and value not in words and not (value.isascii() and value.isdigit()):
        raise UserError(f"--{field.name}={value}: give an integer >= 0 or {' or '.join(words)}.")
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None and value is not None and value not in choices:
        raise UserError(f"--{field.name}={value}: choose one of {', '.join(map(str, choices))}.")
    for number in (value if isinstance(value, tuple) else (value,)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if meta.get("lower") is not None and number < meta["lower"]:
            raise UserError(f"--{field.name}={value}: must be at least {meta['lower']}.")
        if meta.get("upper") is not None and number > meta["upper"]:
            raise UserError(f"--{field.name}={value}: must be at most {meta['upper']}.")
        if meta.get("positive") and not number > 0:
            raise UserError(f"--{field.name}={value}: must be greater than 0.")


def _origin(annotation):
    return typing.get_origin(annotation) or (annotation if isinstance(annotation, type) else None)


def _plain(value):
    """Tuples as lists, so that a config compares equal to its JSON record."""
    return list(value) if isinstance(value, tuple) else value


def _joined(values):
    return ",".join(map(str, values)) if isinstance(values, (list, tuple)) else str(values)


# For `typing.Optional[str]` fields `pnpp_tf.flags` needs the str inside.
def base_type(annotation):
    """The type an annotation stands for: `str` for `Optional[str]`, `tuple` for `tuple[int, ...]`."""
    if _origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return _origin(annotation)


# One vocabulary for every exact search (`pnpp_tf.retrieval.neighbours`), and its earlier names.
_BACKEND_CHOICES = (*neighbours.BACKENDS, *neighbours.ALIASES)
