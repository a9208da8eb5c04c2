"""BestModelSaver: the best model by the key metric, its best score kept across a resumed run."""

from __future__ import annotations

import json

import torch
from ignite.engine import Engine, Events

from ambisam.engines import BestModelSaver


def _validator(saver: BestModelSaver, ged: float) -> Engine:
    """One validation epoch whose key metric (GED, lower is better) is ``ged``."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(e):
        e.state.metrics["val_ged"] = ged

    saver.attach(engine)  # after the metric handler, as MONAI's evaluator computes metrics first
    return engine


def _saver(tmp_path, net):
    return BestModelSaver(str(tmp_path), {"model": net}, key_metric_filename="model.pt",
                          key_metric_negative_sign=True, key_metric_name="val_ged", resume_prefix="checkpoint")


def test_a_resumed_run_does_not_overwrite_a_better_model(tmp_path):
    net = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(net.weight, 1.0)
    _validator(_saver(tmp_path, net), ged=0.2).run([0], max_epochs=1)
    record = json.loads((tmp_path / "model.pt.best.json").read_text())
    assert [score for score, _ in record["saved"]] == [-0.2]  # the saver's score: minus the GED
    best = torch.load(tmp_path / "model.pt", weights_only=True)

    # the run is killed after its epoch checkpoint; the resumed run's first validation scores worse
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    torch.nn.init.constant_(net.weight, 2.0)
    _validator(_saver(tmp_path, net), ged=0.5).run([0], max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], best["weight"])
    # a better one replaces it, and the record follows
    _validator(_saver(tmp_path, net), ged=0.1).run([0], max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], net.weight.detach())
    assert [score for score, _ in json.loads((tmp_path / "model.pt.best.json").read_text())["saved"]] == [-0.1]


def test_a_fresh_run_ignores_an_old_record(tmp_path):
    net = torch.nn.Linear(2, 1)
    _validator(_saver(tmp_path, net), ged=0.1).run([0], max_epochs=1)
    torch.nn.init.constant_(net.weight, 3.0)  # no epoch checkpoint in the folder: not a resume
    _validator(_saver(tmp_path, net), ged=0.9).run([0], max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], net.weight.detach())
