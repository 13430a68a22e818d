"""Training callbacks on stand-ins: the learning-rate schedules, Recall@K and the training clock."""

import json
import types

import pytest

from pnpp_tf.training import callbacks
from pnpp_tf.modeling.optimizers import TorchAdam


def two_optimiser_model(lr=1.0, proxy_lr=100.0):
    return types.SimpleNamespace(optimizer=TorchAdam(lr), proxy_optimizer=TorchAdam(proxy_lr))


def rates(model):
    return [float(model.optimizer.learning_rate.numpy()), float(model.proxy_optimizer.learning_rate.numpy())]


def test_plateau_follows_pytorch_reduce_lr_on_plateau(tmp_path):
    model = two_optimiser_model()
    path = str(tmp_path / "schedule.json")
    schedule = callbacks.PlateauSchedule(path, factor=0.1, patience=2, first_epoch=3)
    schedule.set_model(model)
    # Improvements smaller than the 1e-4 relative threshold do not count.
    values = [0.50, 0.60, 0.60, 0.600001, 0.59, 0.70, 0.65, 0.65, 0.65]
    for epoch, value in enumerate(values, start=3):
        schedule.on_epoch_end(epoch, {"val_recall@1": value})
    recorded = json.loads(open(path, encoding="utf-8").read())
    resumed = callbacks.PlateauSchedule(path, patience=2)
    resumed.set_state(schedule.get_state())
    assert resumed.get_state() == schedule.get_state()
    # Bad epochs after the best at epoch 2: 3, 4, 5 -> drop after epoch 5 (more than 2 bad epochs).
    # New best at 6; bad 7, 8, 9 -> drop after epoch 9.
    assert recorded["lr_drop_epochs"] == [5, 9]
    assert recorded["best_epoch"] == 6 and recorded["best_value"] == pytest.approx(0.70)
    assert rates(model) == pytest.approx([0.01, 1.0])


def test_plateau_needs_the_monitored_value(tmp_path):
    schedule = callbacks.PlateauSchedule(str(tmp_path / "s.json"))
    schedule.set_model(two_optimiser_model())
    with pytest.raises(ValueError, match="val_recall@1"):
        schedule.on_epoch_end(0, {"loss": 1.0})


def test_multistep_replays_drops_like_pytorch_multisteplr():
    model = two_optimiser_model()
    schedule = callbacks.MultiStepSchedule([2, 4], initial_rates=(1.0, 100.0), factor=0.1, first_epoch=1)
    schedule.set_model(model)
    seen = []
    for epoch in range(1, 7):  # main epochs 0..5
        schedule.on_epoch_begin(epoch)
        seen.append(rates(model)[0])
    assert seen == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert rates(model)[1] == pytest.approx(1.0)  # 100 x 0.1 x 0.1


class CountingEvaluator:
    """Stands in for a RetrievalEvaluator: counts its measures and says whether NMI was asked."""

    ks = (1,)

    def __init__(self):
        self.calls = []
        self.distances = []

    def measure(self, model, with_nmi=False, distance=None):
        self.calls.append(with_nmi)
        self.distances.append(distance)
        return {"recall@1": 0.5, "map@r": 0.25, **({"nmi": 0.75} if with_nmi else {})}


@pytest.mark.parametrize("every", [0, 2])
def test_recall_measures_the_last_epoch_in_full_once_and_logs_only_its_rhythm(every):
    evaluator = CountingEvaluator()
    recall = callbacks.RecallAtK(evaluator, every_n_epochs=every, last_epoch=2, with_nmi=True)
    recall.set_model(types.SimpleNamespace(stop_training=False))
    logs = [{} for _ in range(3)]
    for epoch in range(3):
        recall.on_epoch_end(epoch, logs[epoch])
    assert evaluator.calls == ([True] if every == 0 else [False, True])  # epoch 2, then the last
    assert recall.final_metrics == {"recall@1": 0.5, "map@r": 0.25, "nmi": 0.75}
    assert recall.final_seconds is not None and recall.seconds >= 0.0
    assert logs[2] == {} and ("test_recall@1" in logs[1]) == (every == 2)


def test_recall_measures_with_its_distance():
    evaluator = CountingEvaluator()
    recall = callbacks.RecallAtK(evaluator, last_epoch=1, distance="euclidean")
    recall.set_model(types.SimpleNamespace(stop_training=False))
    recall.on_epoch_end(0, {})
    assert evaluator.distances == ["euclidean"]


def test_recall_does_not_measure_an_epoch_cut_short():
    evaluator = CountingEvaluator()
    recall = callbacks.RecallAtK(evaluator, every_n_epochs=1, last_epoch=0)
    recall.set_model(types.SimpleNamespace(stop_training=True))  # the NaN guard stopped it
    recall.on_epoch_end(0, {})
    assert evaluator.calls == [] and recall.final_metrics is None


def test_the_training_clock_counts_an_unfinished_epoch(monkeypatch):
    now = iter([10.0, 13.0, 20.0, 21.5])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(now))
    clock = callbacks.TrainingClock()
    clock.on_epoch_begin(0)
    clock.on_epoch_end(0)  # 3 s
    clock.on_epoch_begin(1)
    assert clock.elapsed() == 4.5  # and 1.5 s of the epoch under way, as a mid-epoch checkpoint sees it
