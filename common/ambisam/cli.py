"""The ``ambisam`` command line (``python -m ambisam ...`` or ``ambisam ...``), one ``fire`` CLI.

Commands:
    synth      a synthetic multi-rater CT-like data set (the embedded default data)
    convert    LIDC (folder or pickle) and QUBIQ layouts -> NIfTI + datalist.json
    segment    the deterministic box-prompted baseline on one 2D image
    demo       the main job on the embedded default: data, sampling, NIfTI outputs and a PNG overview
    bench      benchmarks that print figures (``bench sampling``)
"""

from __future__ import annotations

import logging
import sys

import fire

__all__ = ["main", "Commands"]


class Bench:
    """Benchmarks that print figures."""

    def sampling(
        self,
        method: str = "baseline",
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        num_samples: int = 16,
        repeats: int = 3,
        volume_slices: int = 8,
        threads: int | None = None,
        json: bool = False,
    ) -> None:
        """Encoder ms per slice, decoder ms per sample, the ratio time(N)/time(1) and volume throughput.

        Args:
            method: method name (``baseline`` until bundles register more).
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            num_samples: N.
            repeats: timed repetitions (best kept).
            volume_slices: prompted slices in the volume test.
            threads: torch threads.
            json: print JSON instead of lines.
        """
        from ambisam.bench import print_sampling

        print_sampling(
            as_json=json,
            method=method,
            backbone=backbone,
            checkpoint=checkpoint,
            num_samples=num_samples,
            repeats=repeats,
            volume_slices=volume_slices,
            threads=threads,
        )


    def training(
        self,
        method: str = "psam",
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        batch_size: int = 4,
        repeats: int = 3,
        threads: int | None = None,
        json: bool = False,
    ) -> None:
        """A training step's time from cached embeddings against re-encoding, and the speed-up.

        Args:
            method: a trainable method name.
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            batch_size: slices per step.
            repeats: timed repetitions (best kept).
            threads: torch threads.
            json: print JSON instead of lines.
        """
        from ambisam.bench import print_training

        print_training(as_json=json, method=method, backbone=backbone, checkpoint=checkpoint,
                       batch_size=batch_size, repeats=repeats, threads=threads)


class Commands:
    """ambisam: ambiguity-aware segmentation with SAM, as MONAI bundles."""

    def __init__(self) -> None:
        self.bench = Bench()

    def synth(self, out: str, cases: int = 8, raters: int = 4, seed: int = 0) -> None:
        """Write a synthetic CT-like multi-rater data set (NIfTI + datalist.json) to OUT, deterministic for a seed."""
        from ambisam.data.synth import synthesize

        print(synthesize(out, cases=cases, raters=raters, seed=seed))

    def convert(
        self, format: str, src: str, out: str, split: str = "0.6,0.2,0.2", seed: int = 0, task: str | None = None
    ) -> None:
        """Convert a data set (lidc-folder, lidc-pickle, qubiq) to NIfTI + OUT/datalist.json.

        Args:
            format: lidc-folder, lidc-pickle or qubiq.
            src: the source folder (or pickle file).
            out: the output folder.
            split: train,val,test fractions, by patient (0,0,1 puts every case under test).
            seed: the split's seed.
            task: the QUBIQ label task, for data sets with several (brain-tumor, prostate).
        """
        from ambisam.data.convert import convert

        print(convert(format, src, out, split=split, seed=seed, task=task))

    def segment(self, image: str, box: str, out: str, backbone: str = "litemedsam", checkpoint: str | None = None) -> None:
        """Segment a 2D image (any format MONAI reads) with a box "x_min,y_min,x_max,y_max"; writes a PNG mask."""
        from ambisam.demo import segment_file

        print(segment_file(image, box, out, backbone=backbone, checkpoint=checkpoint))

    def demo(self, out: str = "runs/demo", cases: int = 8, max_epochs: int = 6, num_samples: int = 16, seed: int = 0) -> None:
        """The main job on the embedded default: synthetic data, pSAM trained briefly, evaluated against the
        deterministic baseline with the same prompts, inference outputs (NIfTI) and a PNG overview."""
        from ambisam.demo import run_demo

        run_demo(out, cases=cases, max_epochs=max_epochs, num_samples=num_samples, seed=seed)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ambisam`` console script and ``python -m ambisam``."""
    from ambisam.errors import find_input_error

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        fire.Fire(Commands(), command=argv, name="ambisam")
    except Exception as e:  # bad input: one clear message, no traceback
        bad = find_input_error(e)
        if bad is None:
            raise
        print(f"ambisam: error: {bad}", file=sys.stderr)
        sys.exit(2)
