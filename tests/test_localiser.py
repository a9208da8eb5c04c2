"""UR-SAM's localiser: the intensity map, the losses on hand-computed values, the training views, a few training
steps, the bundle's training config (resuming), the box finding's geometry with an exact stub (anisotropic spacing,
a rotated affine, RAS and LPS) and its bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ambisam.data import NO_BOX, load_datalist, localiser_training_transforms, piecewise_linear_intensity
from ambisam.engines import localiser_views_forward
from ambisam.errors import InputError
from ambisam.inferers import LocaliseOrgansd, OrganLocaliser, box_overlap, extreme_points, score_boxes
from ambisam.losses import LocaliserLoss, PointEmbeddingLoss, RelativeDistanceLoss
from ambisam.networks.localiser import RELATIVE_RANGE_MM, RelativePositionLocaliser
from ambisam.weights import load_weights
from localiser_data import ORGANS, grid_affine, organ_case, organ_dataset

TRAIN_CONFIG = "bundles/ursam/configs/train.json"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine the small 3D convolutions run faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    """Four cases (2 training, 1 validation, 1 test) at 2.5 x 2.5 x 5 mm."""
    return organ_dataset(tmp_path_factory.mktemp("organs"), cases=4, split=(2, 1, 1))


# ------------------------------------------------------------------------------------------------ intensity
def test_piecewise_linear_intensity_hand_values():
    hu = torch.tensor([-3000.0, -1000, -600, -200, 0, 200, 850, 1500, 4000])
    expected = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.0])
    assert torch.allclose(piecewise_linear_intensity(hu), expected, atol=1e-6)
    with pytest.raises(ValueError, match="increasing"):
        piecewise_linear_intensity(hu, knots=(0, 0, 1), values=(0, 1, 2))


# --------------------------------------------------------------------------------------------------- losses
def test_relative_distance_loss_hand_values():
    loss = RelativeDistanceLoss()
    zero = torch.zeros(1, 3)
    # no latent difference predicts no offset: the MSE is the offset's mean square
    assert loss(zero, zero, torch.tensor([[3.0, 4.0, 0.0]])).item() == pytest.approx(25.0 / 3)
    # tanh(atanh(0.5)) = 0.5: the prediction is r / 2 = (300, 300, 750) mm along (i, j, k)
    half = torch.full((1, 3), math.atanh(0.5))
    assert RELATIVE_RANGE_MM == (600.0, 600.0, 1500.0)
    assert loss(half, zero, torch.tensor([[300.0, 290.0, 750.0]])).item() == pytest.approx(100.0 / 3, rel=1e-5)
    # the sign: p_a - p_b predicts centre_a - centre_b
    assert loss(zero, half, torch.tensor([[-300.0, -300.0, -750.0]])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        RelativeDistanceLoss(range_mm=(1, 2))


def test_point_embedding_loss_hand_values():
    loss = PointEmbeddingLoss(temperature=0.5)
    e = torch.eye(2)[None]  # two orthonormal embeddings, the same in both crops
    assert loss(e, e).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    swapped = e.flip(1)  # each point most similar to the other one
    assert loss(e, swapped).item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)


def test_localiser_loss_components():
    torch.manual_seed(0)
    outputs = {"position": torch.zeros(2, 3, 3),
               "features": [torch.nn.functional.normalize(torch.randn(2, 3, 4, s, s, s), dim=2) for s in (8, 4)]}
    target = {"offset_mm": torch.full((2, 2, 3), 10.0), "points": torch.rand(2, 2, 5, 3) * 63}
    loss = LocaliserLoss(distance_weight=0.01, embedding_weight=0.0)
    assert loss(outputs, target).item() == pytest.approx(1.0)  # 100 mm^2 in cm^2
    parts = loss.components()
    assert parts["distance_mse_mm2"] == pytest.approx(100.0) and parts["distance_rmse_mm"] == pytest.approx(10.0)
    assert 0 < parts["embedding"] < 10


# -------------------------------------------------------------------------------------------------- network
def test_network_outputs_and_size():
    net = RelativePositionLocaliser()
    out = net(torch.rand(2, 1, 64, 64, 64))
    assert out["position"].shape == (2, 3)
    assert [tuple(f.shape) for f in out["features"]] == [(2, 16, 32, 32, 32), (2, 16, 16, 16, 16), (2, 16, 8, 8, 8)]
    assert torch.all(out["position"] == 0)  # the head starts at zero: no offset predicted
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    with pytest.raises(ValueError, match="expected patches"):
        net(torch.rand(1, 1, 32, 32, 32))


# ------------------------------------------------------------------------------------------ training views
def test_training_views_offsets_and_points(datalist):
    item = load_datalist(datalist, "training")[0]
    validation = localiser_training_transforms(augment=False)
    a, b = validation(dict(item)), validation(dict(item))
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 64, 64, 64)  # seeded per case
    # unaugmented: views 0 and 1 are one crop; the offsets are whole grid voxels of 3 mm
    assert torch.equal(a["image"][0], a["image"][1]) and torch.equal(a["offset_mm"][0], a["offset_mm"][1])
    assert torch.allclose(a["offset_mm"] / 3.0, torch.round(a["offset_mm"] / 3.0))
    assert torch.allclose(a["points"][0], a["points"][1])
    train = localiser_training_transforms(augment=True, num_points=32)
    train.set_random_state(1)
    c = train(dict(item))
    assert c["points"].shape == (2, 32, 3) and not torch.allclose(c["points"][0], c["points"][1])
    assert c["points"].min() >= 0 and c["points"].max() <= 63


def test_a_few_steps_reduce_the_relative_distance_loss(datalist):
    torch.manual_seed(0)
    train = localiser_training_transforms(augment=True, num_points=32)
    train.set_random_state(0)
    items = load_datalist(datalist, "training")
    samples = [train(dict(item)) for item in items]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", "offset_mm", "points")}
    net, loss = RelativePositionLocaliser(), LocaliserLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def distance() -> float:
        with torch.no_grad():
            loss(localiser_views_forward(net, batch["image"]), batch)
        return loss.components()["distance_mse_mm2"]

    before = distance()
    for _ in range(8):
        optimizer.zero_grad()
        loss(localiser_views_forward(net, batch["image"]), batch).backward()
        optimizer.step()
    assert distance() < 0.5 * before


# ------------------------------------------------------------------------------------------ bundle training
def _train(tmp, datalist, **override):
    from monai.bundle import ConfigWorkflow

    from ambisam.bundle.config import resolve_macros

    tmp.mkdir(parents=True, exist_ok=True)
    meta = tmp / "metadata.json"
    meta.write_text(json.dumps({"version": "0.0.0", "monai_version": "1.6.1", "pytorch_version": "2",
                                "numpy_version": "1", "required_packages_version": {}}))
    wf = ConfigWorkflow(config_file=TRAIN_CONFIG, meta_file=str(meta), workflow_type="train")
    wf.parser.set(resolve_macros(wf.parser.get(), TRAIN_CONFIG))
    wf.parser.update(pairs={"dataset_dir": str(datalist.parent), "ckpt_dir": str(tmp / "models"),
                            "output_dir": str(tmp / "runs"), "pairs_per_volume": 1, "num_points": 16,
                            **override})
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    return wf


def test_bundle_trains_and_resumes_where_it_stopped(datalist, tmp_path):
    straight = _train(tmp_path / "straight", datalist, max_epochs=2)
    assert straight.parser.get_parsed_content("train#trainer").state.epoch == 2
    # a run stopped after epoch 1, then run again with the same folders: it continues from the checkpoint
    stopped = _train(tmp_path / "resumed", datalist, max_epochs=1)
    first = stopped.parser.get_parsed_content("train#trainer").state.iteration
    models = tmp_path / "resumed" / "models"
    assert (models / "localiser_checkpoint_epoch=1.pt").is_file()
    resumed = _train(tmp_path / "resumed", datalist, max_epochs=2)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * first
    assert (models / "localiser_checkpoint_epoch=2.pt").is_file()
    assert not (models / "localiser_checkpoint_epoch=1.pt").exists()
    # epochs are seeded by seed + epoch: the resumed run ends at the interrupted one's weights
    a = load_weights(tmp_path / "straight" / "models" / "localiser_checkpoint_epoch=2.pt")["model"]
    b = load_weights(models / "localiser_checkpoint_epoch=2.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = load_weights(models / "localiser.pt")
    RelativePositionLocaliser().load_state_dict(weights)
    # the trained weights through the box finding (the real network's path: patches, latents, dense features)
    from monai.transforms import LoadImage

    localiser = OrganLocaliser.from_datalist(models / "localiser.pt", datalist, "training", num_supports=2,
                                             coarse_steps=2, search_size=6)
    image = LoadImage(image_only=True, ensure_channel_first=True)(load_datalist(datalist, "test")[0]["image"])
    boxes = localiser.locate(image, ["liver", "aorta"])
    assert all(box is None or all(0 <= box[a] <= box[a + 3] < image.shape[1 + a] for a in range(3))
               for box in boxes.values())
    run = json.loads((tmp_path / "resumed" / "runs" / "run.json").read_text())
    assert run["bundle"] == "ursam" and run["seed"] == 0 and "torch" in run["versions"]
    training = json.loads((tmp_path / "resumed" / "runs" / "training.json").read_text())
    assert training["epochs"] == 2 and training["validation_curve"][-1]["val_offset_error_mm"] > 0


# ----------------------------------------------------------------------------------------- box geometry
class WorldStub(OrganLocaliser):
    """A localiser whose regression is exact: the latent position of a patch is its centre's world position over
    ``r`` (so ``r * tanh(p_s - p_q)`` is, within tanh's curvature, the world offset, and a few moves converge), and
    a point's embedding a smooth function of its world position (most similar at the same world point)."""

    period_mm = 400.0

    def __init__(self, supports, class_map, **kwargs):
        super().__init__(torch.nn.Identity(), supports, class_map, **kwargs)

    def latent_positions(self, grid, centres):
        starts = grid.patch_starts(centres).double() + (grid.patch_size - 1) / 2.0
        return torch.as_tensor(grid.to_world(starts.numpy()) / np.asarray(RELATIVE_RANGE_MM), dtype=torch.float32)

    def point_features(self, grid, centres, points):
        world = grid.to_world(points.reshape(-1, 3).numpy()) * (2 * np.pi / self.period_mm)
        f = np.concatenate([np.cos(world), np.sin(world)], axis=-1) / np.sqrt(3.0)
        return torch.as_tensor(f, dtype=torch.float32).reshape(*points.shape[:2], 6)


def _case(tmp, name, spacing, orientation="RAS", rotation=0.0, seed=0):
    """A case on its own grid: a MetaTensor image as LoadImage gives it, and the label's array."""
    from monai.transforms import LoadImage

    from ambisam.io import write_nifti

    affine, shape = grid_affine(spacing, orientation, rotation)
    image, label = organ_case(affine, shape, np.random.default_rng(seed))
    write_nifti(tmp / f"{name}.nii.gz", image, affine)
    write_nifti(tmp / f"{name}_label.nii.gz", label, affine)
    return LoadImage(image_only=True, ensure_channel_first=True)(str(tmp / f"{name}.nii.gz")), label


@pytest.fixture(scope="module")
def supports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supports")
    items = []
    for n in range(2):
        _case(tmp, f"support{n}", (2.5, 2.5, 5.0), seed=10 + n)
        items.append({"image": str(tmp / f"support{n}.nii.gz"), "label": [str(tmp / f"support{n}_label.nii.gz")]})
    return items


CLASS_MAP = {name: spec[0] for name, spec in ORGANS.items()}


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_boxes_land_on_the_organs_on_any_grid(tmp_path, orientation):
    # the supports hold the query's anatomy (one seed) on other grids, so the stub's boxes are exact
    supports = []
    for n, (spacing, support_orientation) in enumerate([((2.5, 2.5, 5.0), "RAS"), ((1.5, 2.0, 3.0), "LPS")]):
        _case(tmp_path, f"support{n}", spacing, support_orientation, seed=3)
        supports.append({"image": str(tmp_path / f"support{n}.nii.gz"),
                         "label": str(tmp_path / f"support{n}_label.nii.gz")})
    image, label = _case(tmp_path, "query", (0.8, 0.8, 5.0), orientation, rotation=15.0, seed=3)
    assert image.shape[1:] == label.shape and image.affine[0, 0] * (1 if orientation == "RAS" else -1) > 0
    boxes = WorldStub(supports, CLASS_MAP).locate(image, ["liver", "kidney_left", "aorta"])
    for organ, box in boxes.items():
        inside = np.argwhere(label == CLASS_MAP[organ])
        # the organ's tight box extended by [10, 10, 2] voxels (x, y in-plane along i, j; z along k), clipped
        expected = [*np.maximum(inside.min(axis=0) - (10, 10, 2), 0),
                    *np.minimum(inside.max(axis=0) + (10, 10, 2), np.asarray(label.shape) - 1)]
        assert all(0 <= box[a] <= box[a + 3] < image.shape[1 + a] for a in range(3))
        covered = np.all((inside >= box[:3]) & (inside <= box[3:]), axis=1).mean()
        # within the discretisation: a 3 mm grid voxel in-plane (0.8 mm voxels; the world-axis extreme points of
        # a rotated organ lie a little inside its box along the rotated axes), a slice along k
        error = np.abs(np.asarray(box) - np.asarray(expected))
        assert covered > 0.99 and np.all(error <= (5, 5, 1, 5, 5, 1)), (organ, box, expected, covered)
        assert box_overlap(box, expected)[0] > 0.75


def test_extreme_points_and_box_overlap_hand_values():
    points = np.array([[0.0, 0, 0], [2, 1, 0], [1, 3, 5]])
    ends = extreme_points(points)
    assert np.allclose(ends[0], [0, 0, 0]) and np.allclose(ends[3], [1, 3, 5]) and np.allclose(ends[5], [1, 3, 5])
    assert box_overlap([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]) == (1.0, 1.0)
    iou, dice = box_overlap([0, 0, 0, 1, 1, 1], [1, 0, 0, 2, 1, 1])
    assert iou == pytest.approx(1 / 3) and dice == pytest.approx(0.5)
    assert box_overlap([0, 0, 0, 1, 1, 1], [5, 5, 5, 6, 6, 6]) == (0.0, 0.0)


def test_localise_organsd_writes_boxes_and_no_box_rows(supports, tmp_path, monkeypatch):
    image, _ = _case(tmp_path, "query", (2.5, 2.5, 5.0), seed=4)
    localiser = WorldStub(supports, CLASS_MAP, search_size=8)
    transform = LocaliseOrgansd(localiser, ["spleen", "liver"])
    real = localiser.locate
    monkeypatch.setattr(localiser, "locate", lambda img, organs: {**real(img, organs), "liver": None})
    out = transform({"image": image})
    depth = image.shape[-1]
    assert out["structures"] == ["spleen", "liver"]
    assert out["box3d"].shape == (2, 6) and out["box"].shape == (2, depth, 4)
    spleen = out["box3d"][0].long().tolist()
    assert torch.all(out["box3d"][1] == -1) and torch.all(out["box"][1] == torch.tensor(NO_BOX))
    assert torch.equal(out["box"][0, spleen[2]], torch.tensor([spleen[1], spleen[0], spleen[4], spleen[3]]).float())
    assert spleen[2] > 0 and torch.all(out["box"][0, 0] == torch.tensor(NO_BOX))
    # the benchmark's scoring: one value per volume that has the organ, 0 for a box not found
    scores = score_boxes(localiser, [{"image": str(tmp_path / "query.nii.gz"),
                                      "label": [str(tmp_path / "query_label.nii.gz")]}], ["spleen", "liver"])
    assert scores["liver"]["iou"] == [0.0] and scores["liver"]["coverage"] == [0.0]
    assert 0.3 < scores["spleen"]["iou"][0] <= 1 and scores["spleen"]["coverage"][0] > 0.5
    assert len(scores["seconds"]) == 1


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_refused_with_the_file_named(supports, tmp_path):
    with pytest.raises(InputError, match="support list is empty"):
        WorldStub([], CLASS_MAP)
    with pytest.raises(InputError, match="not in the class map"):
        WorldStub(supports, CLASS_MAP).locate(MetaTensor(torch.zeros(1, 8, 8, 8)), ["heart"])
    with pytest.raises(InputError, match="not in the class map"):
        LocaliseOrgansd(WorldStub(supports, CLASS_MAP), ["liver", "heart"])
    # a support scan without a requested organ: its label file and the organ are named
    no_spleen = dict(CLASS_MAP, spleen=7)
    with pytest.raises(InputError, match=r"support0_label\.nii\.gz.*no voxel of organ 'spleen'"):
        WorldStub(supports, no_spleen).support_templates("spleen")
    # a volume under 48 mm along an axis at 3 mm: refused, naming its file; one under a patch is padded
    from monai.transforms import LoadImage, SpatialCrop

    from ambisam.io import write_nifti

    write_nifti(tmp_path / "thin.nii.gz", np.zeros((60, 60, 4), np.int16), np.diag([2.5, 2.5, 5.0, 1.0]))
    thin = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "thin.nii.gz"))
    with pytest.raises(InputError, match=r"thin\.nii\.gz.*at least 48 mm"):
        WorldStub(supports, CLASS_MAP).locate(thin, ["liver"])
    small, _ = _case(tmp_path, "small", (2.5, 2.5, 5.0), seed=5)
    cropped = SpatialCrop(roi_start=(20, 10, 4), roi_end=(90, 80, 36))(small)  # 175 x 175 x 160 mm: padded
    box = WorldStub(supports, CLASS_MAP, search_size=4).locate(cropped, ["liver"])["liver"]
    assert box is None or all(0 <= box[a] <= box[a + 3] < cropped.shape[1 + a] for a in range(3))
