"""`python -m pnpp_tf.train` whose data changes under it: after the checkpoint of epoch
$PNPP_CHANGE_AFTER_EPOCH, each path in $PNPP_DELETE is deleted and each in $PNPP_EMPTY emptied
($PNPP_GARBLE: overwritten with random bytes); a path that is a directory is removed whole.

Run by test_changing_data.py, so that the change falls at a known point of a real training process.
"""

import os
import shutil

from pnpp_tf.training import callbacks


def _change_data():
    for path in filter(None, os.environ.get("PNPP_DELETE", "").split(os.pathsep)):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for path in filter(None, os.environ.get("PNPP_EMPTY", "").split(os.pathsep)):
        open(path, "wb").close()  # pylint: disable=consider-using-with
    for path in filter(None, os.environ.get("PNPP_GARBLE", "").split(os.pathsep)):
        with open(path, "wb") as file:
            file.write(os.urandom(300))


_save_at_epoch_end = callbacks.SaveCheckpoints.on_epoch_end


def _on_epoch_end(self, epoch, logs=None):
    _save_at_epoch_end(self, epoch, logs)
    if epoch + 1 == int(os.environ["PNPP_CHANGE_AFTER_EPOCH"]):
        _change_data()


if __name__ == "__main__":
    callbacks.SaveCheckpoints.on_epoch_end = _on_epoch_end
    from pnpp_tf import flags, train  # pylint: disable=import-outside-toplevel
    from pnpp_tf.config import TrainConfig  # pylint: disable=import-outside-toplevel

    flags.run(train.main, TrainConfig, "pnpp_tf.train")
