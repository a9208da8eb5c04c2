"""The ``ambisam`` command line (``python -m ambisam ...`` or ``ambisam ...``), one ``fire`` CLI.

Commands:
    synth      a synthetic multi-rater CT-like data set (the embedded default data), or --organs a
               multi-organ abdominal CT one
    convert    LIDC (folder or pickle) and QUBIQ layouts -> NIfTI + datalist.json
    segment    the deterministic box-prompted baseline on one 2D image
    demo       the main job on the embedded default: a small benchmark of every bundle and the SAM baselines
    bench      benchmarks that print figures (``bench sampling``, ``bench training``, ``bench memory``,
               ``bench scale``, ``bench precision``, ``bench propagation``)
    export     a bundle as a self-contained model-zoo zip
    verify     an exported zip's weights against the checksums it records
    benchmark  every method and baseline trained and scored alike
"""

from __future__ import annotations

import logging
import sys

import fire

from ambisam.registry import DEFAULT_METHODS

__all__ = ["main", "Commands"]


class Bench:
    """Benchmarks that print figures."""

    def sampling(
        self,
        method: str = "all",
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        num_samples: int = 16,
        repeats: int = 3,
        volume_slices: int = 64,
        threads: int | None = None,
        training: bool = True,
        json: bool = False,
        precision: str = "fp32",
        structures: int | None = None,
    ) -> None:
        """Encoder ms per slice, decoder ms per sample, the ratio time(N)/time(1) and volume throughput.

        Args:
            method: a method name (printed as lines), or ``all`` / a comma-separated list (one Markdown table
                with every method's figures and, for the trainable ones, the cached-embedding training speed-up).
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            num_samples: N.
            repeats: timed repetitions (best kept).
            volume_slices: prompted slices in the volume test (a 256 x 256 x D volume, every slice prompted).
            threads: torch threads.
            training: in the table, also measure the training speed-up of the trainable methods.
            json: print JSON instead of lines.
            precision: fp32, bf16 or auto: what the figures are measured in; a lower one than fp32 also prints
                its encoder and per-sample decoder speed-up over fp32, measured in the same run.
            structures: structures (organs) prompted per slice in the volume test, from one embedding; default 13
                for a multi-organ method (ursam), 1 otherwise and in the table.
        """
        from ambisam.bench import print_methods, print_sampling

        settings = dict(backbone=backbone, checkpoint=checkpoint, num_samples=num_samples, repeats=repeats,
                        volume_slices=volume_slices, threads=threads, precision=precision)
        if structures is not None:
            settings["structures"] = structures
        if isinstance(method, str) and method != "all" and "," not in method:
            print_sampling(as_json=json, method=method, **settings)
        else:  # fire passes "a,b" as a tuple
            print_methods(as_json=json, methods=method if isinstance(method, str) else list(method),
                          training=training, **settings)

    def training(
        self,
        method: str = "psam",
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        batch_size: int = 4,
        repeats: int = 3,
        threads: int | None = None,
        stage: int = 1,
        json: bool = False,
    ) -> None:
        """A training step's time from cached embeddings against re-encoding, and the speed-up (in a stage whose
        encoder trains, the step's time alone: every step encodes).

        Args:
            method: a trainable method name (the step of its training stage STAGE, built from its bundle's configs).
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            batch_size: slices per step.
            repeats: timed repetitions (best kept).
            threads: torch threads.
            stage: the training stage, 1-based (``ambisam.registry``'s ``stages``; P2SAM has 2).
            json: print JSON instead of lines.
        """
        from ambisam.bench import print_training

        print_training(as_json=json, method=method, backbone=backbone, checkpoint=checkpoint,
                       batch_size=batch_size, repeats=repeats, threads=threads, stage=stage)

    def memory(
        self,
        bundle: str = "psam",
        size: int = 512,
        slices: int = 300,
        box_slices: int = 4,
        num_samples: int = 16,
        root: str | None = None,
        json: bool = False,
    ) -> None:
        """Peak RSS of a bundle's inference (``monai.bundle run`` in a fresh process) on a generated CT whose box
        prompts a few slices (:mod:`ambisam.bench_memory`).

        Args:
            bundle: the bundle whose ``configs/inference.json`` runs (initialised weights).
            size: in-plane size of the CT.
            slices: its slices.
            box_slices: the slices the box prompts.
            num_samples: N.
            root: another checkout to run (its ``bundles/`` and ``common/``), e.g. to measure a branch.
            json: print JSON instead of a line.
        """
        import json as json_

        from ambisam.bench_memory import format_memory, inference_peak_rss

        r = inference_peak_rss(bundle=bundle, size=size, slices=slices, box_slices=box_slices,
                               num_samples=num_samples, root=root)
        print(json_.dumps(r) if json else format_memory(r))

    def scale(
        self,
        method: str = "all",
        sizes: str = "500,2000,8000",
        steps: int = 30,
        warmup: int = 3,
        data_dir: str | None = None,
        default_data: bool = True,
        slice_batch_size: str | None = None,
        embedding_cache_ram_mb: float | None = None,
        backbone: str = "litemedsam",
        threads: int | None = None,
        json: bool = False,
    ) -> None:
        """Training throughput and peak RSS against the data set's size, per trainable bundle (fresh process per
        method and size; synthetic embeddings through the real embedding cache: see ``ambisam.bench_scale``).

        Args:
            method: ``all`` (every trainable bundle) or a comma-separated list.
            sizes: data set sizes in training slices, comma-separated.
            steps: timed steps per measurement.
            warmup: untimed steps first.
            data_dir: keep the generated data there (reused next time); default: a temporary folder.
            default_data: also measure on the embedded default data set.
            slice_batch_size: override ``train_slice_batch_size`` (``none``: whole batches).
            embedding_cache_ram_mb: override the embedding cache's RAM bound (default: the config's).
            backbone: backbone registry name.
            threads: torch threads.
            json: print JSON instead of the table.
        """
        from ambisam.bench_scale import print_scale

        if isinstance(sizes, (int, float)):
            sizes = str(int(sizes))
        size_list = [int(s) for s in (sizes.split(",") if isinstance(sizes, str) else sizes)]
        print_scale(as_json=json, methods=method if isinstance(method, str) else list(method), sizes=size_list,
                    steps=steps, warmup=warmup, data_dir=data_dir, default_data=default_data,
                    slice_batch_size=slice_batch_size, embedding_cache_ram_mb=embedding_cache_ram_mb,
                    backbone=backbone, threads=threads)

    def precision(
        self,
        precision: str = "bf16",
        lidc: str | None = None,
        synthetic: int = 3,
        repeats: int = 2,
        timed_slices: int = 1,
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        threads: int | None = None,
        json: bool = False,
        cases: str | tuple[str, ...] | None = None,
    ) -> None:
        """Per-slice Dice of PRECISION's box-baseline masks against fp32's (LIDC sample and synthetic slices, box
        from the raters' union), and the encoder's and decoder's speed-up, timed in turn in one process.

        Args:
            precision: bf16 or auto.
            lidc: the LIDC sample folder (read in place), e.g. ../shared/data/lidc-sample.
            synthetic: synthetic slices.
            repeats: timed rounds (best kept).
            timed_slices: the first so many slices are timed too.
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            threads: torch threads.
            json: print JSON instead of lines.
            cases: comma-separated LIDC case ids (default: every case).
        """
        from ambisam.bench_precision import print_precision

        if isinstance(cases, (str, int)):
            cases = [c for c in str(cases).split(",") if c]

        print_precision(as_json=json, precision=precision, lidc=lidc, synthetic=synthetic, repeats=repeats,
                        timed_slices=timed_slices, backbone=backbone, checkpoint=checkpoint, threads=threads,
                        progress=not json, cases=None if cases is None else [str(c) for c in cases])

    def propagation(
        self,
        dataset_dir: str = "data/synthetic",
        split: str = "test",
        num_samples: int = 4,
        margin: int = 3,
        start: str | int = "centre",
        method: str = "baseline",
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        threads: int | None = None,
        seed: int = 0,
        structures: str | tuple[str, ...] | None = None,
        out: str = "runs/bench/propagation.json",
        json: bool = False,
    ) -> None:
        """Dice per structure of a box-prompted method given each structure's tight 3D box (from the raters' union):
        the same 2D box on every slice against box propagation; seconds and slices encoded of each
        (``ambisam.bench_propagation``).

        Args:
            dataset_dir: a data set folder with datalist.json (a new or empty one gets the synthetic default); a
                multi-label datalist's class map names the structures.
            split: the split measured, or comma-separated splits (training,validation,test: every case).
            num_samples: N samples per slice.
            margin: the propagation margin in pixels.
            start: centre, or the slice index propagation starts on.
            method: a training-free method (baseline, multimask, jitter).
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            threads: torch threads.
            seed: the run's seed.
            structures: comma-separated structures of the class map (default: all).
            out: the JSON record of the figures and the run.
            json: print JSON instead of the table.
        """
        from ambisam.bench_propagation import print_propagation

        if isinstance(structures, str):
            structures = [s for s in structures.split(",") if s]
        if not isinstance(split, str):  # fire passes "a,b" as a tuple
            split = ",".join(split)
        print_propagation(as_json=json, dataset_dir=dataset_dir, split=split, num_samples=num_samples, margin=margin,
                          start=start, method=method, backbone=backbone, checkpoint=checkpoint, threads=threads,
                          seed=seed, structures=None if structures is None else list(structures), out=out)


class Commands:
    """ambisam: ambiguity-aware segmentation with SAM, as MONAI bundles."""

    def __init__(self) -> None:
        self.bench = Bench()

    def synth(
        self,
        out: str,
        cases: int | None = None,
        raters: int | None = None,
        seed: int = 0,
        rater_styles: bool = False,
        organs: bool | str | tuple[str, ...] | None = None,
        spacing: str | tuple[float, ...] | None = None,
    ) -> None:
        """Write a synthetic CT-like data set (NIfTI + datalist.json) to OUT, deterministic for a seed: one lesion
        per case outlined by K raters, or with --organs the 13 abdominal organs of FLARE22 (one label map per case).

        Args:
            out: the output folder.
            cases: the number of cases (default 8; 6 with --organs).
            raters: the number of raters K (default 4; the organ data set has one).
            seed: the random seed.
            rater_styles: (``--rater_styles`` or ``--rater-styles``) the 4 raters draw the same way on every case:
                generous, conservative, misses_faint (some lesions are then faint), typical; the datalist names them.
            organs: the multi-organ abdominal CT data set instead (``--organs``: all 13; ``--organs
                liver,spleen,kidney_left``: those labelled, with FLARE22's values); 96 x 96 x 32 voxels.
            spacing: with --organs, the voxel size in mm along i,j,k (default 1.6,1.6,5.0).
        """
        from ambisam.data.synth import synthesize_dataset

        print(synthesize_dataset(out, organs, cases=cases, raters=raters, seed=seed, rater_styles=rater_styles,
                                 spacing=spacing))

    def convert(
        self,
        format: str,
        src: str,
        out: str,
        split: str = "0.6,0.2,0.2",
        seed: int = 0,
        task: str | None = None,
        groups: str | None = None,
        groups_column: str | None = None,
    ) -> None:
        """Convert a data set (lidc-folder, lidc-pickle, qubiq) to NIfTI + OUT/datalist.json.

        Args:
            format: lidc-folder, lidc-pickle or qubiq.
            src: the source folder (or pickle file).
            out: the output folder.
            split: train,val,test fractions, by patient (0,0,1 puts every case under test).
            seed: the split's seed.
            task: the QUBIQ label task, for data sets with several (brain-tumor, prostate).
            groups: a JSON file {case id: patient} or a CSV file (with groups_column): cases of one patient stay
                in one split. Without it a folder format splits by case (a warning says so).
            groups_column: the CSV column holding the patient.
        """
        from ambisam.data.convert import convert

        print(convert(format, src, out, split=split, seed=seed, task=task, groups=groups, groups_column=groups_column))

    def segment(self, image: str, box: str, out: str, backbone: str = "litemedsam", checkpoint: str | None = None,
                precision: str = "fp32") -> None:
        """Segment a 2D image (any format MONAI reads) with a box "x_min,y_min,x_max,y_max"; writes a PNG mask
        (PRECISION: fp32, bf16 or auto, see ambisam.sam.precision)."""
        from ambisam.demo import segment_file

        print(segment_file(image, box, out, backbone=backbone, checkpoint=checkpoint, precision=precision))

    def train(self, method: str, **overrides) -> None:
        """Train a method's bundle through all of its stages in order, each from the previous stage's weights
        (the registry's ``stages``: ``python -m ambisam train psam --max_epochs 3``; overrides are config ids)."""
        from ambisam.bundle import run_stages
        from ambisam.errors import InputError
        from ambisam.registry import get_method

        spec = get_method(method)
        if not spec.trainable:
            raise InputError(None, f"method '{method}' is training-free: nothing to train")
        for workflow in run_stages(spec.config_bundle, spec.stages, **{**spec.config_overrides(), **overrides}):
            parser = workflow.parser
            print(f"{method}: weights in {parser.get_parsed_content('ckpt_dir')}/{parser.get_parsed_content('model_file')}")

    def demo(self, out: str = "runs/demo", cases: int = 8, budget: float = 0.75, num_samples: int = 16, seed: int = 0,
             methods: str | tuple[str, ...] | None = None, precision: str | None = None) -> None:
        """The main job on the embedded default: a small benchmark of the whole collection. Synthetic data; every
        bundle's method trained within BUDGET minutes and scored with the training-free SAM baselines on the test
        split, alike; prints the table and where the figures are.

        Args:
            out: the output folder.
            cases: synthetic cases.
            budget: training minutes per trained method.
            num_samples: N samples per slice.
            seed: data, training and sampling seed.
            methods: comma-separated methods (default: every bundle's, then the training-free baselines).
            precision: the evaluation's precision, fp32, bf16 or auto (default: the bundles'); training is fp32.
        """
        from ambisam.demo import run_demo

        run_demo(out, cases=cases, budget=budget, num_samples=num_samples, seed=seed, methods=methods,
                 precision=precision)

    def export(
        self,
        bundle: str,
        out: str = "dist",
        weights: str | None = None,
        no_weights: bool = False,
        torchscript: bool = False,
        weights_url: str | None = None,
    ) -> None:
        """Write a self-contained bundle zip OUT/<name>_v<version>.zip (configs, docs, LICENSE, models/model.pt if
        trained) for `monai.bundle download` and the model zoo (see docs/distribution.md).

        Args:
            bundle: a bundle name under bundles/, or a bundle folder.
            out: the output folder.
            weights: trained weights to ship as models/model.pt (default: the bundle's own models/model.pt).
            no_weights: leave the weights out (e.g. hosted elsewhere: see weights_url).
            torchscript: also ship models/model.ts (scripted, else traced for the metadata's input shape).
            weights_url: where models/model.pt will be hosted: adds large_files.yml with its md5.
        """
        from ambisam.export import export_bundle

        print(export_bundle(bundle, out, weights=weights, include_weights=not no_weights, torchscript=torchscript,
                            weights_url=weights_url))

    def verify(self, zip: str) -> None:
        """Check that an exported bundle zip's weights are the ones it records (configs/metadata.json
        weights_checksums, sha256); a zip whose weights differ, or that holds unrecorded ones, is refused.

        Args:
            zip: a zip written by `ambisam export`.
        """
        from ambisam.export import verify_bundle_zip

        checked = verify_bundle_zip(zip)
        for member, sha256 in checked.items():
            print(f"{member}: sha256 {sha256} OK")
        print(f"{zip}: {len(checked)} weights file(s) match the recorded checksums")

    def benchmark(
        self,
        data: str = "data/synthetic",
        methods: str = DEFAULT_METHODS,
        samples: int = 16,
        out: str = "runs/benchmark",
        budget: float | None = 3.0,
        seeds: int = 1,
        max_epochs: int | None = None,
        backbone: str = "litemedsam",
        checkpoint: str | None = None,
        modality: str | None = None,
        window: str | None = None,
        num_raters: int | None = None,
        figure_cases: int = 4,
        threads: int | None = None,
        isolate: bool = True,
        rerun: bool = False,
        prompt: str = "union",
        prompt_jitter: int = 0,
        train_prompt: str | None = None,
    ) -> None:
        """Train (or reuse) and evaluate methods and baselines with the same data, prompts and metrics; writes
        OUT/results.json, OUT/results.md and OUT/figures/*.png (see docs/benchmarks.md).

        Args:
            data: a datalist JSON, or a folder holding datalist.json (a new folder gets the synthetic default).
            methods: comma-separated names of ambisam.registry (psam, seqsam, mcl, p2sam, proseg, ursam, baseline,
                multimask, jitter, mc_dropout, prob_unet); one not implemented yet is reported as unavailable.
            samples: N samples per prompted slice.
            out: the output folder.
            budget: training minutes per method and seed.
            seeds: seeds 0..seeds-1 (mean +/- std); deterministic methods run once.
            max_epochs: every trained method's max_epochs (default: the bundle's own).
            backbone: backbone registry name.
            checkpoint: backbone weights, where needed.
            modality: ct, mri or none (default: the datalist's own "intensity", as synth and convert write it).
            window: the CT window "low,high" (default: the datalist's, else the bundles').
            num_raters: raters per case (default: the bundles' 4).
            figure_cases: test cases drawn in the per-case figures.
            threads: torch threads per job.
            isolate: one process per job, so that each job's peak memory is its own.
            rerun: redo jobs already completed in OUT with the same settings.
            prompt: the evaluation's box-prompt protocol: union (the raters' union box per slice) or random_rater
                (a random non-empty rater's box per slice, seeded).
            prompt_jitter: jitter of the evaluation boxes in pixels.
            train_prompt: the training boxes' protocol (default: the same as prompt).
        """
        from ambisam.benchmark import run_benchmark

        run_benchmark(data=data, methods=methods, samples=samples, out=out, budget=budget, seeds=seeds,
                      max_epochs=max_epochs, backbone=backbone, checkpoint=checkpoint, modality=modality,
                      window=window, num_raters=num_raters, figure_cases=figure_cases, threads=threads,
                      isolate=isolate, rerun=rerun, prompt=prompt, prompt_jitter=prompt_jitter,
                      train_prompt=train_prompt)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ambisam`` console script and ``python -m ambisam``."""
    from ambisam.allocator import keep_freed_memory
    from ambisam.errors import find_input_error

    keep_freed_memory()  # before the first large tensor: see ambisam.allocator
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        fire.Fire(Commands(), command=argv, name="ambisam")
    except Exception as e:  # bad input: one clear message, no traceback
        bad = find_input_error(e)
        if bad is None:
            raise
        print(f"ambisam: error: {bad}", file=sys.stderr)
        sys.exit(2)
