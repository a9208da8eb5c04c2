"""Training killed with SIGKILL in the middle of an epoch resumes from the last checkpoint and ends at the same
weights as a run that was never interrupted, bit for bit on CPU (issue 16, "Faults").

What makes it so: the trainer seeds every epoch's random generators by ``seed + epoch`` before the epoch's loader
iterator is made (``MultiRaterTrainer(seed=...)``, ``train.json``'s ``seed``), and the epoch checkpoint holds the
model, optimizer, learning-rate schedule and trainer state. psam is the bundle: its training draws (box jitter,
the rater, the posterior sample) all come from those generators."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from bundle_checks import ROOT, run_workflow, small_dataset, train_overrides

BUNDLE = "psam"

#: run in a fresh process: the first run, killed with SIGKILL by a handler on the first iteration of epoch 2
_KILLED_RUN = """
import json, os, signal, sys
sys.path.insert(0, {bundles!r})
from ignite.engine import Events
from bundle_checks import workflow

wf = workflow({bundle!r}, ("train",), "train", **json.loads({overrides!r}))
wf.initialize()
trainer = wf.parser.get_parsed_content("train#trainer")

@trainer.on(Events.ITERATION_COMPLETED)
def _kill(engine):
    if engine.state.epoch == 2:  # one step into epoch 2, after epoch 1's checkpoint was written
        os.kill(os.getpid(), signal.SIGKILL)

wf.run()
"""


def _model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_training_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    datalist = small_dataset(tmp_path / "data", cases=5, split=(0.6, 0.2, 0.2))  # 3 training volumes
    settings = {"max_epochs": 2, "batch_size": 1}

    straight = tmp_path / "uninterrupted"
    wf = run_workflow(BUNDLE, ("train",), "train", **train_overrides(straight, datalist.parent, **settings))
    iterations = wf.parser.get_parsed_content("train#trainer").state.iteration
    assert iterations == 6  # 3 steps an epoch: the kill below lands inside epoch 2

    killed = tmp_path / "killed"
    overrides = train_overrides(killed, datalist.parent, **settings)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN.format(bundles=str(ROOT / "tests" / "bundles"), bundle=BUNDLE,
                                                  overrides=json.dumps(overrides))],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    models = killed / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file() and not (models / "checkpoint_epoch=2.pt").exists()
    # no partial or temporary file left by the kill: the epoch checkpoint, the best model and its score's record
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt", "model.pt.best.json"]
    best_before_kill = json.loads((models / "model.pt.best.json").read_text())["saved"]

    after_epoch1 = _model_state(models / "checkpoint_epoch=1.pt")

    resumed = run_workflow(BUNDLE, ("train",), "train", **overrides)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == iterations

    expected = _model_state(straight / "models" / "checkpoint_epoch=2.pt")
    found = _model_state(models / "checkpoint_epoch=2.pt")
    assert expected.keys() == found.keys()
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # the resumed run knew epoch 1's best score: model.pt is the better of the two epochs, as uninterrupted
    best = json.loads((models / "model.pt.best.json").read_text())["saved"]
    assert best == json.loads((straight / "models" / "model.pt.best.json").read_text())["saved"]
    assert best[0][0] >= best_before_kill[0][0]
    # epoch 2 did move the weights: the comparison is not of two copies of epoch 1's
    assert any(not torch.equal(after_epoch1[k], expected[k]) for k in expected)
