"""Converts a torchvision ResNet-50 state dict into weights of the `resnet50_torchvision` backbone.

Usage:

    python tools/convert_torchvision_resnet50.py --input=resnet50-11ad3fa6.pth \
        --output=resnet50_torchvision.weights.h5
    python -m pnpp_tf.train --backbone=resnet50_torchvision \
        --weights=resnet50_torchvision.weights.h5 ...

`.pth`/`.pt` files are read with `torch.load(weights_only=True)` (needs `torch`; no pickled code
is executed); `.safetensors` files need only the `safetensors` package. The classifier (`fc.*`) and
`num_batches_tracked` are dropped; any missing, unexpected or mis-shaped key stops the conversion
with a message naming it.
"""

import argparse
import os
import sys

# Runnable as a plain script from a checkout: make `pnpp_tf` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# The input size only fixes the graph; the weights are the same for every size.
_BUILD_SHAPE = (224, 224, 3)


def read_state_dict(path, strip_prefix=""):
    """Reads a state dict as {key: float32 numpy array}.

    Args:
        path: a `.pth`/`.pt` (torch) or `.safetensors` file.
        strip_prefix: removed from the start of every key that has it, e.g. "module." for a
            checkpoint saved from `DataParallel`.

    Returns:
        A dict of numpy arrays; integer tensors (e.g. `num_batches_tracked`) keep their dtype.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise SystemExit("Reading .safetensors needs `pip install safetensors`.") from error
        tensors = load_file(path)
    elif path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as error:
            raise SystemExit("Reading .pth needs PyTorch (`pip install torch`, CPU build).") from error
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        # Some training checkpoints wrap the weights; torchvision's files are the bare dict.
        if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict):
            raise SystemExit(f"{path} holds a {type(tensors).__name__}, not a state dict.")
        tensors = {k: _torch_to_numpy(v) for k, v in tensors.items()}
    else:
        raise SystemExit(f"--input must end with .pth, .pt or .safetensors, got {path!r}.")
    if strip_prefix:
        tensors = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v
                   for k, v in tensors.items()}
    return {k: _as_float32(v) for k, v in tensors.items()}


def _torch_to_numpy(tensor):
    import torch

    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    tensor = tensor.detach().cpu()
    # numpy has no bfloat16; every float weight becomes float32 anyway.
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _as_float32(array):
    array = np.asarray(array)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def convert(input_path, output_path, strip_prefix=""):
    """Converts `input_path` to a Keras `.weights.h5` file at `output_path`.

    Returns:
        A dict with the counts of converted tensors and parameters and the ignored keys.

    Raises:
        ValueError: if the state dict does not match the torchvision ResNet-50.
    """
    if not output_path.endswith(".weights.h5"):
        raise SystemExit(f"--output must end with .weights.h5 (Keras' format), got {output_path!r}.")
    from pnpp_tf.modeling.torchvision_resnet import build_resnet50_torchvision, load_torchvision_state_dict

    state_dict = read_state_dict(input_path, strip_prefix)
    trunk = build_resnet50_torchvision(_BUILD_SHAPE)
    ignored = load_torchvision_state_dict(trunk, state_dict)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    trunk.save_weights(output_path)
    used = [k for k in state_dict if k not in ignored]
    return {
        "tensors": len(used),
        "parameters": int(sum(state_dict[k].size for k in used)),
        "ignored": ignored,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="torchvision state dict: .pth, .pt or .safetensors")
    parser.add_argument("--output", required=True, help="Keras weights file to write: *.weights.h5")
    parser.add_argument("--strip_prefix", default="",
                        help='removed from the start of every key, e.g. "module."')
    args = parser.parse_args(argv)
    try:
        summary = convert(args.input, args.output, args.strip_prefix)
    except ValueError as error:
        raise SystemExit(f"Conversion failed: {error}") from error
    ignored = summary["ignored"]
    print(f"Read {args.input}: converted {summary['tensors']} tensors "
          f"({summary['parameters']:,} values, BatchNorm running statistics included); "
          f"ignored {len(ignored)} key(s): fc.* and num_batches_tracked.")
    print(f"Wrote {args.output}. Use it with --backbone=resnet50_torchvision --weights={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
