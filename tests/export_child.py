"""Runs `pnpp_tf.export` as `python -m` does, after test-only changes that stop it at one moment.

    python tests/export_child.py STOP --model_dir=... --export_dir=... [flags]

STOP is one of:
    fail_parity             every SavedModel variant must reach a mean cosine of 1.5, so parity fails
    wait_after_parity       once parity is measured on the written, unpublished parts, creates
                            `<export_dir>.measured` and sleeps, for the test to SIGKILL it
    die_before_saved_model  SIGKILLs itself just before the SavedModel directory is published (the
                            TFLite folder and the report are already in place)
"""

import os
import runpy
import signal
import sys
import time


def main():
    stop = sys.argv.pop(1)
    export_dir = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--export_dir="))
    from pnpp_tf import io_utils  # pylint: disable=import-outside-toplevel
    from pnpp_tf.serving import parity  # pylint: disable=import-outside-toplevel

    if stop == "fail_parity":
        parity.MIN_MEAN_COSINE["saved_model"] = 1.5
    elif stop == "wait_after_parity":
        measure = parity.measure_parity

        def measure_then_wait(*args, **kwargs):
            measure(*args, **kwargs)
            with open(export_dir + ".measured", "w", encoding="utf-8"):
                pass
            time.sleep(600)

        parity.measure_parity = measure_then_wait
    elif stop == "die_before_saved_model":
        publish = io_utils.Staged.publish

        def publish_or_die(self):
            if os.path.dirname(self.path) == export_dir and os.path.basename(self.path).isdigit():
                os.kill(os.getpid(), signal.SIGKILL)
            publish(self)

        io_utils.Staged.publish = publish_or_die
    else:
        raise SystemExit(f"unknown STOP {stop!r}")
    runpy.run_module("pnpp_tf.export", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
