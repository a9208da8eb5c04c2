"""The per-case writer's named samples and the metrics report's merge of a second scoring of the same cases."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ambisam.outputs import write_case_outputs


def _maps(n=3, shape=(6, 5, 2)):
    samples = torch.zeros(n, *shape)
    for i in range(n):
        samples[i, : i + 1] = 1  # sample i marks i + 1 rows
    mean = samples.mean(0, keepdim=True)
    return {"pred": (mean > 0.5).float(), "mean": mean, "uncertainty": mean, "variance": mean, "samples": samples}


def test_named_samples_are_written_one_file_each_in_order(tmp_path):
    paths = write_case_outputs(tmp_path, "c0", _maps(), np.eye(4), {"bundle": "x"},
                               sample_names=["rater-a", "rater-b", "rater-c"])
    for i, name in enumerate(["rater-a", "rater-b", "rater-c"]):
        data = np.asarray(nib.load(paths[f"sample:{name}"]).dataobj)
        assert paths[f"sample:{name}"].name == f"c0_{name}.nii.gz" and data.dtype == np.uint8
        assert data.shape == (6, 5, 2) and int(data[:, 0, 0].sum()) == i + 1
    assert "c0_rater-b.nii.gz" in json.loads(paths["record"].read_text())["files"].values()


@pytest.mark.parametrize("names", [["a", "b"], ["a", "a", "b"]])
def test_sample_names_must_name_every_sample_once(tmp_path, names):
    with pytest.raises(ValueError, match="must name each of the 3 samples"):
        write_case_outputs(tmp_path, "c0", _maps(), np.eye(4), sample_names=names)
    assert list(tmp_path.iterdir()) == []  # the case's five files were complete, but the case was not


def test_a_full_disk_names_the_file_and_leaves_none_of_the_cases_files(tmp_path, monkeypatch):
    import errno

    from nibabel.openers import ImageOpener

    from ambisam.errors import OutputError

    write_case_outputs(tmp_path, "c0", _maps(), np.eye(4))  # an earlier case, complete
    before = sorted(p.name for p in tmp_path.iterdir())
    opened, real_write = [], ImageOpener.write

    def write(self, data):  # the third file of the case meets a full disk after some of its bytes
        if self.name not in opened:
            opened.append(self.name)
        if len(opened) == 3:
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(ImageOpener, "write", write)
    with pytest.raises(OutputError) as err:
        write_case_outputs(tmp_path, "c1", _maps(), np.eye(4), {"bundle": "x"})
    assert str(err.value) == f"{tmp_path / 'c1_uncertainty.nii.gz'}: could not write the file: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # c1: no file, no temporary file


def test_a_second_scoring_merges_into_the_report_of_the_same_cases(tmp_path):
    from ignite.engine import Engine, Events

    from ambisam.engines import MetricsReportWriter

    def scored(metrics, cases, merge, extra):
        engine = Engine(lambda e, batch: [{"id": batch}])

        @engine.on(Events.EPOCH_COMPLETED)
        def _score(e):  # a metric handler's completion, before the writer's
            e.state.metrics.update(metrics)
            e.state.metric_details = {k: torch.full((len(cases),), v) for k, v in metrics.items()}

        MetricsReportWriter(tmp_path, num_samples=4, merge=merge, extra=extra).attach(engine)
        engine.run(cases, max_epochs=1)

    scored({"ged": 0.5}, ["a", "b"], False, {"mode": "diverse"})
    scored({"personalised_dice": 0.75}, ["a", "b"], True, {"mode": "personalised"})
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["overall"] == {"ged4": 0.5, "personalised_dice": 0.75} and report["mode"] == "diverse"
    assert report["per_case"]["personalised_dice"] == [0.75, 0.75]
    assert report["merged"] == [{"mode": "personalised", "num_samples": 4, "metrics": ["personalised_dice"]}]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "case,ged4,personalised_dice"
    with pytest.raises(ValueError, match="scored the cases"):
        scored({"x": 1.0}, ["a", "c"], True, {})
