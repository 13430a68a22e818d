"""The PyTorch reference loop (tools/torch_reference.py) in a child process that never imports TensorFlow.

    from torch_process import TorchProcess

    with TorchProcess() as reference:        # starts `python tools/torch_process.py`
        state = reference.build(num_classes=16, embedding_dim=64, dtype="float64")
        reference.call("start_warmup")
        loss = reference.call("step", images, labels)
        gradients = reference.get("last_gradients")

Why a child: with the CUDA build of torch (the one `pip install -e ".[convert]"` gives on Linux,
with triton), a process that has imported TensorFlow dies of a segmentation fault when
`torch.optim.Adam` first imports torch._dynamo and triton, whichever of torch and TensorFlow it
imported first. A child started with `subprocess` (not multiprocessing's 'spawn', which re-imports
the parent's __main__ and with it pnpp_tf and TensorFlow) imports only torch and numpy, so the
harness and the tests work whatever they imported before.

The two processes exchange pickled requests and answers (numpy arrays, floats, strings) over the
child's stdin and stdout; the child's own prints go to stderr.
"""

import os
import pickle
import subprocess
import sys
import traceback

TOOLS = os.path.dirname(os.path.abspath(__file__))


class TorchProcess:
    """A child process holding one or more `ReferenceLoop`s, driven by method calls.

    The child runs this file as a script, so Python puts tools/ (torch_reference, the converter's
    reader) on its path; it imports nothing of pnpp_tf.

    Attributes:
        torch_version: the child's `torch.__version__`.
    """

    def __init__(self):
        command = [sys.executable, os.path.join(TOOLS, "torch_process.py")]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.torch_version = self._request("version")

    def build(self, name="reference", **kwargs):
        """Builds a loop in the child (`torch_reference.build_reference(**kwargs)`).

        Args:
            name: the loop's name in the child, for `call` and `get` (several may live there).
            **kwargs: `build_reference`'s arguments; a `weights` path is read in the child and
                passed on as its `state_dict`.

        Returns:
            The new loop's `state()`: {name: numpy array}.
        """
        return self._request("build", name, kwargs)

    def call(self, method, *args, name="reference"):
        """Calls a method of the loop `name` in the child; returns what it returns (picklable)."""
        return self._request("call", name, method, args)

    def get(self, attribute, name="reference"):
        """An attribute of the loop `name` in the child, e.g. "last_gradients"."""
        return self._request("get", name, attribute)

    def close(self):
        """Ends the child (it exits when its stdin closes) and waits for it; kills it if it hangs."""
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def _request(self, *request):
        """Sends one request; returns the child's answer, or raises what went wrong in it."""
        try:
            pickle.dump(request, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
            status, value = pickle.load(self._process.stdout)
        except (EOFError, BrokenPipeError) as error:
            raise RuntimeError(f"The PyTorch child process died (exit status {self._process.wait()}) "
                               f"during {request[0]!r}.") from error
        if status == "error":
            raise RuntimeError(f"The PyTorch child process failed during {request[0]!r}:\n{value}")
        return value


def _serve(requests, answers):
    """The child's loop: answers requests until its stdin closes.

    Args:
        requests: the binary stream of pickled requests (stdin).
        answers: the binary stream the answers are pickled to (the original stdout).
    """
    import torch  # pylint: disable=import-outside-toplevel - only the child imports torch

    import torch_reference  # pylint: disable=import-outside-toplevel

    loops = {}
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = ("ok", _answer(request, loops, torch, torch_reference))
        except Exception:  # pylint: disable=broad-except - reported to the parent, which raises
            answer = ("error", traceback.format_exc())
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


def _answer(request, loops, torch, torch_reference):
    """What one request asks for (see `TorchProcess`)."""
    kind, *rest = request
    if kind == "version":
        return torch.__version__
    if kind == "build":
        name, kwargs = rest
        kwargs = dict(kwargs)
        weights = kwargs.pop("weights", "")
        if weights:
            from convert_torchvision_resnet50 import read_state_dict  # pylint: disable=import-outside-toplevel
            kwargs["state_dict"] = {**read_state_dict(weights), **(kwargs.get("state_dict") or {})}
        loops[name] = torch_reference.build_reference(**kwargs)
        return loops[name].state()
    if kind == "call":
        name, method, args = rest
        return getattr(loops[name], method)(*args)
    if kind == "get":
        name, attribute = rest
        return getattr(loops[name], attribute)
    raise ValueError(f"Unknown request {kind!r}.")


def main():
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Anything torch or the reference prints goes to stderr, not into the answers.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
