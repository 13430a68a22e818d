"""pnpp_tf's training loop beside the authors' (tools/torch_reference.py), step for step, on CPU.

    pip install -e ".[convert]"     # torch, CPU build
    python tools/parity_with_reference.py --warmup_steps=1 --steps=10 --batch_size=8 --image_size=64 \
        --json=parity.json

Both loops start from the same weights: the PyTorch ResNet-50's (torchvision's random init, seeded,
or --weights=<a torchvision .pth/.safetensors>), converted for pnpp_tf's `resnet50_torchvision`
trunk by the converter's mapping; the same Linear layer and proxies. Both see the same batches:
random images in [0, 255] and class-balanced labels. After each step the table gives the largest
relative difference of the loss, of every gradient (before clipping), of every weight (BatchNorm
running statistics and proxies included) and of every weight's change since the start, each as
max |ours - theirs| / max |theirs| over one tensor, with the tensor where it is largest.

The exit status is 1 if the loss or the weights differ by more than --loss_tolerance or
--weight_tolerance at any step.

--control also steps a float64 copy of the PyTorch loop and reports how far it moves from the
float32 one: the divergence that float32 rounding alone causes in the authors' own loop, the floor
under which no float32 port can stay (from random weights at the recipe's learning rates the loop
amplifies a 1e-7 difference to 1e-2 within three steps, PyTorch against itself included).
"""

import argparse
import sys

from machine import describe_machine, machine_info, write_results  # also makes pnpp_tf importable

import numpy as np

RECIPE = {"lr": 4e-3, "proxy_lr": 4e2, "clip_value": 10.0, "temperature": 1.0 / 9.0}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="main steps after the warm-up")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--classes_per_batch", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--embedding_dim", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--proxy_lr", type=float, default=RECIPE["proxy_lr"])
    parser.add_argument("--clip_value", type=float, default=RECIPE["clip_value"])
    parser.add_argument("--weights", default="", help="torchvision ResNet-50 .pth/.safetensors; empty: random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="of both networks (the loss stays float32); float64 shows what float32 rounding adds")
    parser.add_argument("--loss_tolerance", type=float, default=1e-3)
    parser.add_argument("--weight_tolerance", type=float, default=1e-2)
    parser.add_argument("--control", action="store_true",
                        help="also compare the PyTorch loop in float32 with itself in float64")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.batch_size % args.classes_per_batch or args.classes_per_batch > args.num_classes:
        parser.error("--batch_size must be a multiple of --classes_per_batch <= --num_classes.")
    return args


def build_pair(args):
    """The PyTorch reference and a compiled-later `ProxyNCAModel`, with the same weights.

    Returns:
        (reference, model, variables): `variables` maps each reference state name to
        (the pnpp_tf variable, a function from its value to PyTorch's layout).
    """
    import keras
    import torch_reference
    from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
    from pnpp_tf.modeling.torchvision_resnet import expected_state_dict_shapes, load_torchvision_state_dict

    state_dict = None
    if args.weights:
        from convert_torchvision_resnet50 import read_state_dict
        state_dict = read_state_dict(args.weights)
    reference = torch_reference.build_reference(args.num_classes, args.embedding_dim, args.lr, args.proxy_lr,
                                                args.clip_value, RECIPE["temperature"], state_dict, args.seed,
                                                args.dtype)
    state = reference.state()
    keras.utils.set_random_seed(args.seed)
    keras.config.set_dtype_policy(args.dtype)
    embedder = build_embedder("resnet50_torchvision", args.image_size, args.embedding_dim, "max", True, "none")
    trunk = embedder.get_layer("backbone")
    load_torchvision_state_dict(trunk, {k: v for k, v in state.items() if not k.startswith(("embedding.", "proxies"))})
    model = ProxyNCAModel(embedder, args.num_classes, RECIPE["temperature"])
    dense = embedder.get_layer("embedding")
    dense.kernel.assign(state["embedding.weight"].T)
    dense.bias.assign(state["embedding.bias"])
    model.loss_layer.proxies.assign(state["proxies"])
    variables = {key: (variable, _to_torch_layout) for key, (variable, _) in expected_state_dict_shapes(trunk).items()}
    variables["embedding.weight"] = (dense.kernel, np.transpose)
    variables["embedding.bias"] = (dense.bias, _to_torch_layout)
    variables["proxies"] = (model.loss_layer.proxies, _to_torch_layout)
    missing = set(state) ^ set(variables)
    if missing:
        raise SystemExit(f"The two models' tensors do not correspond: {sorted(missing)}")
    return reference, model, variables


def _to_torch_layout(array):
    """Keras' conv kernel [kh, kw, in, out] as PyTorch's [out, in, kh, kw]; other tensors as they are."""
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array


def batches(args):
    """The same class-balanced batches for both loops: (float32 NHWC images in [0, 255], labels)."""
    rng = np.random.default_rng(args.seed)
    per_class = args.batch_size // args.classes_per_batch
    for _ in range(args.warmup_steps + args.steps):
        classes = rng.choice(args.num_classes, args.classes_per_batch, replace=False)
        images = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
        yield images, np.repeat(classes, per_class).astype(np.int32)


def our_gradients(model, variables, images, labels):
    """pnpp_tf's loss and gradients at the current weights, as its train step computes them.

    The forward pass in training mode moves BatchNorm's running statistics, so they are put back
    afterwards: the train step that follows must start from the same ones as PyTorch's step.
    """
    import tensorflow as tf

    statistics = [(v, v.numpy()) for v in model.embedder.non_trainable_variables]
    trained = {name: v for name, (v, _) in variables.items() if v.trainable}
    with tf.GradientTape() as tape:
        loss = model.loss_layer(model.embedder(images, training=True), labels)
    gradients = tape.gradient(loss, list(trained.values()))
    for variable, value in statistics:
        variable.assign(value)
    return float(loss), {name: g.numpy() for name, g in zip(trained, gradients)}


def compile_phase(model, args, warmup):
    from pnpp_tf.modeling.optimizers import TorchAdam

    model.compile(optimizer=TorchAdam(args.lr), proxy_optimizer=TorchAdam(args.proxy_lr), freeze_backbone=warmup,
                  clip_value=args.clip_value, jit_compile=False)


def largest(ours, theirs):
    """(the largest max |a - b| / max |b| over the tensors named in both, the tensor's name)."""
    worst = (0.0, "")
    for name, reference in theirs.items():
        scale = float(np.abs(reference).max())
        difference = float(np.abs(ours[name] - reference).max())
        relative = difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))
        worst = max(worst, (relative, name))
    return worst


def run(args):
    import torch_reference

    reference, model, variables = build_pair(args)
    control = None
    if args.control:
        control = torch_reference.build_reference(args.num_classes, args.embedding_dim, args.lr, args.proxy_lr,
                                                  args.clip_value, RECIPE["temperature"], reference.state(),
                                                  args.seed, "float64" if args.dtype == "float32" else "float32")

    def our_state():
        return {name: convert(v.numpy()) for name, (v, convert) in variables.items()}

    start = reference.state()
    rows = []
    for step, (images, labels) in enumerate(batches(args)):
        warmup = step < args.warmup_steps
        if step in (0, args.warmup_steps):
            for loop in filter(None, (reference, control)):
                (loop.start_warmup if warmup else loop.start_main)()
            compile_phase(model, args, warmup)
        tape_loss, gradients = our_gradients(model, variables, images, labels)
        their_loss = reference.step(images, labels)
        their_gradients = reference.last_gradients
        model.reset_metrics()  # the logged loss is then this step's, not a running mean
        our_loss = float(model.train_on_batch(images, labels, return_dict=True)["loss"])
        ours, theirs = our_state(), reference.state()
        gradient = largest({k: variables[k][1](g) for k, g in gradients.items()}, their_gradients)
        weight = largest(ours, theirs)
        # A tensor that neither loop changed (the backbone's in the warm-up) differs by 0.
        update = largest({k: ours[k] - start[k] for k in ours}, {k: theirs[k] - start[k] for k in theirs})
        rows.append({"phase": "warm-up" if warmup else "main", "step": step + 1, "loss_theirs": their_loss,
                     "loss_ours": our_loss, "loss_rel_diff": abs(our_loss - their_loss) / abs(their_loss),
                     "tape_loss_rel_diff": abs(tape_loss - their_loss) / abs(their_loss),
                     "gradient_rel_diff": gradient[0], "gradient_worst": gradient[1],
                     "weight_rel_diff": weight[0], "weight_worst": weight[1],
                     "update_rel_diff": update[0], "update_worst": update[1]})
        if control is not None:
            control_loss = control.step(images, labels)
            rows[-1]["control_loss_rel_diff"] = abs(control_loss - their_loss) / abs(their_loss)
            rows[-1]["control_weight_rel_diff"], rows[-1]["control_weight_worst"] = largest(control.state(), theirs)
        print(table_row(rows[-1]) if rows[1:] else table_header(control is not None) + "\n" + table_row(rows[-1]),
              flush=True)
    return rows


def table_header(control=False):
    extra = " control: loss | control: weights |" if control else ""
    return ("| phase | step | loss (PyTorch) | loss | gradients (largest: tensor) | weights (largest: tensor) | "
            f"weight changes (largest: tensor) |{extra}\n|---|---|---|---|---|---|---|" + "---|" * (2 * control))


def table_row(row):
    extra = ""
    if "control_loss_rel_diff" in row:
        extra = (f" {row['control_loss_rel_diff']:.1e} | {row['control_weight_rel_diff']:.1e}: "
                 f"{row['control_weight_worst']} |")
    return (f"| {row['phase']} | {row['step']} | {row['loss_theirs']:.6f} | {row['loss_rel_diff']:.1e} | "
            f"{row['gradient_rel_diff']:.1e}: {row['gradient_worst']} | {row['weight_rel_diff']:.1e}: "
            f"{row['weight_worst']} | {row['update_rel_diff']:.1e}: {row['update_worst']} |{extra}")


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf
    import keras
    import torch

    machine = machine_info(tensorflow=tf.__version__, keras=keras.__version__, torch=torch.__version__)
    print("Relative differences max |pnpp_tf - PyTorch| / max |PyTorch| per tensor; the largest per step.\n")
    rows = run(args)
    summary = {"loss_rel_diff": max(r["loss_rel_diff"] for r in rows),
               "gradient_rel_diff": max(r["gradient_rel_diff"] for r in rows),
               "weight_rel_diff": max(r["weight_rel_diff"] for r in rows),
               "update_rel_diff": max(r["update_rel_diff"] for r in rows)}
    if args.control:
        summary["control_loss_rel_diff"] = max(r["control_loss_rel_diff"] for r in rows)
        summary["control_weight_rel_diff"] = max(r["control_weight_rel_diff"] for r in rows)
    summary["passed"] = bool(summary["loss_rel_diff"] <= args.loss_tolerance
                             and summary["weight_rel_diff"] <= args.weight_tolerance)
    print(f"\nMachine: {describe_machine(machine)}.")
    print(f"Largest: loss {summary['loss_rel_diff']:.1e} (tolerance {args.loss_tolerance:g}), gradients "
          f"{summary['gradient_rel_diff']:.1e}, weights {summary['weight_rel_diff']:.1e} (tolerance "
          f"{args.weight_tolerance:g}), weight changes {summary['update_rel_diff']:.1e}: "
          f"{'PASS' if summary['passed'] else 'FAIL'}")
    if args.json:
        write_results(args.json, __file__, argv, machine, rows, settings=vars(args), summary=summary)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
