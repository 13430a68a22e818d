"""absl flags shared by the entry points. Defaults are the paper's recipe for CUB-200-2011.

Every flag also works in a --flagfile (one `--name=value` per line); configs/ holds one per
dataset.
"""

import functools
import sys
import types

from absl import flags

from pnpp_tf import backbones
from pnpp_tf.data import DATASETS
from pnpp_tf.data.image_check import ON_BAD_IMAGE
from pnpp_tf.distribute import STRATEGIES
from pnpp_tf.data.pipeline import SAMPLERS
from pnpp_tf.losses import VARIANTS
from pnpp_tf.model import POOLINGS
from pnpp_tf.serving import DEFAULT_MAX_PIXELS


def parse_eval_ks(values):
    """The sorted, distinct K of --eval_ks (a list of strings); () when it is empty.

    Raises:
        ValueError: a value is not a positive integer.
    """
    try:
        ks = sorted({int(k) for k in values})
    except ValueError:
        raise ValueError(f"--eval_ks must be positive integers, got {','.join(values)}.") from None
    if ks and ks[0] < 1:
        raise ValueError(f"--eval_ks must be positive integers, got {','.join(values)}.")
    return tuple(ks)


def define_data_flags(flag_values=flags.FLAGS):
    """Flags naming the data and where results go."""
    define = _definer(flag_values)
    define.enum("dataset", "glyphs", DATASETS, "Dataset reader.")
    define.string("data_dir", None, "Dataset directory (glyphs: rendered here on first use).")
    define.string("model_dir", None, "Where checkpoints, logs and results.json are written.")
    define.integer("image_size", 256, "Side of the square input images, in pixels.", lower_bound=16)
    define.list("eval_ks", [], "The K of Recall@K; empty: the dataset's protocol "
                "(1,2,4,8 for CUB/Cars/folder/glyphs, 1,10,100,1000 for SOP, 1,10,...,50 for In-Shop).")
    define.integer("eval_batch_size", 64, "Images per inference batch.", lower_bound=1)
    define.enum("on_bad_image", "error", ON_BAD_IMAGE, "An image that does not decode: error "
                "(stop, naming it) or skip (train without it; logged, counted in results.json).")
    define.integer("max_pixels", DEFAULT_MAX_PIXELS, "Largest width x height of an image read from the "
                   "data; a larger one counts as a bad image (see --on_bad_image). Read from the file "
                   "header before decoding, so one huge file cannot exhaust memory.", lower_bound=1)


def define_cache_flags(flag_values=flags.FLAGS):
    """Flags of the on-disk image cache (training only: evaluation reads each image once)."""
    define = _definer(flag_values)
    define.string("cache_dir", "", "Decode every image once into this directory (downsized to "
                  "--cache_short_side) and read the decoded pixels in every epoch: for datasets whose "
                  "decoded images fit on disk. Empty: decode the files every epoch.")
    define.integer("cache_short_side", 0, "Shorter side of the cached training images, in pixels (smaller "
                   "images are kept as they are); 0: 288/256 of --image_size, the side evaluation resizes "
                   "to. Evaluation images are always cached at that side.", lower_bound=0)


def define_model_flags(flag_values=flags.FLAGS):
    """Flags shaping the embedder and the loss."""
    define = _definer(flag_values)
    define.enum("backbone", "resnet50", backbones.available_backbones(), "Backbone trunk.")
    define.string("weights", "imagenet", "Backbone weights: imagenet, none, or a weights file path.")
    define.integer("embedding_dim", 2048, "Embedding size.", lower_bound=1)
    define.enum("pooling", "max", POOLINGS, "Global pooling of the last feature map.")
    define.boolean("layer_norm", True, "LayerNorm (no affine parameters) on the pooled features.")
    define.enum("loss", "proxynca_pp", VARIANTS, "proxynca_pp, or the original proxynca.")
    define.float("temperature", 1.0 / 9.0, "Softmax temperature of the loss.")
    _require_positive(flag_values, "temperature")


def define_training_flags(flag_values=flags.FLAGS):
    """Flags of the optimisation and the compute."""
    define = _definer(flag_values)
    define.enum("mode", "trainval", ["trainval", "train"],
                "trainval: all training classes, test on the test classes. train (stage 1): first "
                "half of the training classes, validate on the second half, reduce the LR on plateau "
                "and record the schedule in <model_dir>/schedule.json.")
    define.list("lr_drop_epochs", [], "trainval: main epochs after which both LRs drop by --lr_decay.")
    define.string("lr_schedule_from", None, "trainval: a stage-1 model_dir whose schedule.json "
                  "gives --lr_drop_epochs and --epochs (its best epoch).")
    define.float("lr_decay", 0.1, "LR multiplier at each drop (both stages).")
    define.integer("plateau_patience", 4, "train: epochs without validation improvement before a drop.",
                   lower_bound=0)
    define.integer("batch_size", 32, "Images per batch.", lower_bound=1)
    define.integer("classes_per_batch", 8, "Distinct classes per batch (class-balanced sampling).", lower_bound=1)
    define.enum("sampler", "balanced", SAMPLERS, "balanced: classes_per_batch classes x equal images "
                "(ProxyNCA++); random: batches without class structure (the ablation).")
    define.integer("epochs", 40, "Training epochs after the warm-up.", lower_bound=1)
    define.integer("warmup_epochs", 5, "Epochs training only the embedding layer and proxies.", lower_bound=0)
    define.float("lr", 4e-3, "Learning rate of the backbone and embedding layer.")
    define.float("proxy_lr", 4e2, "Learning rate of the proxies.")
    define.float("clip_value", 10.0, "Clip backbone and embedding gradients by value (0: off).", lower_bound=0)
    define.boolean("flip", True, "Random horizontal flips in training.")
    define.integer("eval_every", 1, "Measure Recall@K on the test split every N epochs (0: only at the end).",
                   lower_bound=0)
    define.enum("jit_compile", "auto", ["auto", "true", "false"], "XLA for the train step; auto: on GPU only.")
    define.enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"],
                "Keras dtype policy of the backbone; loss, proxies and logits stay float32, and "
                "float16 uses dynamic loss scaling.")
    define.enum("strategy", "default", STRATEGIES, "tf.distribute strategy: default (one device), "
                "mirrored (all local GPUs), multi_worker (TF_CONFIG cluster), tpu.")
    define.string("tpu", None, "--strategy=tpu: TPU name or grpc:// address (empty: local TPU VM).")
    define.boolean("sync_batch_norm", True, "With several replicas, BatchNorm statistics over the "
                   "whole global batch (as on one device) rather than per replica.")
    define.integer("seed", 0, "Seed of weights, sampling and augmentation.", lower_bound=0)
    define.boolean("deterministic", False, "Deterministic TensorFlow ops: two runs with the same "
                   "--seed give identical weights (slower on GPU).")
    define.boolean("debug_numerics", False, "Check every op for NaN/Inf and name the first that "
                   "produces one (slow: for debugging).")
    define.integer("keep_checkpoints", 3, "Checkpoints kept in <model_dir>/checkpoints.", lower_bound=1)
    define.integer("checkpoint_every_steps", 0, "Also checkpoint every N steps within an epoch "
                   "(0: at the end of each epoch only); a rerun resumes at that step.", lower_bound=0)
    define.integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.",
                   lower_bound=0, upper_bound=2)
    _require_positive(flag_values, "lr", "proxy_lr", "lr_decay")


def parse_flags_or_exit(program):
    """An `absl.app.run(flags_parser=...)` that reports a bad flag in one line and exits 2.

    absl's own parser prints the error and a second line of help; every other error of the
    entry points is one `<program>: error: ...` line with exit status 2, and so is this one.

    Args:
        program: the entry point's name, e.g. "pnpp_tf.train".

    Returns:
        The parser: `argv -> the arguments left after the flags`.
    """

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            print(f"{program}: error: {error} (see --helpfull)", file=sys.stderr)
            sys.exit(2)

    return parse


def _definer(flag_values):
    """`flags.DEFINE_<kind>` as `definer.<kind>`, each defining its flag in `flag_values`.

    Tests define the flags in a fresh `flags.FlagValues` to parse command lines without touching
    the global FLAGS.
    """
    kinds = ("string", "integer", "float", "boolean", "enum", "list")
    return types.SimpleNamespace(**{kind: functools.partial(getattr(flags, f"DEFINE_{kind}"),
                                                            flag_values=flag_values) for kind in kinds})


def _require_positive(flag_values, *names):
    """Range checks of float flags that must be strictly positive (absl's bounds are inclusive)."""
    for name in names:
        flags.register_validator(name, lambda value: value is not None and value > 0,
                                 message="must be greater than 0", flag_values=flag_values)
