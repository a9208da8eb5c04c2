"""The snapshot ensemble of stage-2 P2SAM checkpoints on the real LiteMedSAM backbone: how the samples are split
between the snapshots and seeded, the checkpoints it accepts and refuses, the one backbone it registers, and the
``forward`` of every method.

The snapshots are a stage-2 network with randomised prompt layers, saved to files; the samples are drawn from
random embeddings (one image is encoded, by ``forward``)."""

from __future__ import annotations

import copy

import pytest
import torch

from ambisam.errors import InputError
from ambisam.networks import Conditions, MaskSamplingNetwork, P2Sam, SnapshotEnsemble
from conftest import pickled_checkpoint

BATCH = 2


@pytest.fixture(scope="module")
def stage2(litemedsam):
    torch.manual_seed(0)
    return P2Sam(copy.deepcopy(litemedsam), stage=2).eval()


def _snapshot_state(network: P2Sam, seed: int) -> dict[str, torch.Tensor]:
    """``network``'s state dict with its prompt layers drawn at random (as if trained to another epoch)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    for k, v in state.items():
        if k.startswith(("prompt_generator.", "dense_prompt_mapping.")) and v.is_floating_point():
            v.normal_(0, 0.05, generator=generator)
    return state


@pytest.fixture(scope="module")
def snapshots(stage2, tmp_path_factory):
    """Three snapshot files: the first two as MONAI's CheckpointSaver writes them, the third a bare state dict."""
    folder = tmp_path_factory.mktemp("snapshots")
    states, paths = [], []
    for i in range(3):
        state = _snapshot_state(stage2, seed=10 + i)
        path = folder / f"snapshot_{i}.pt"
        torch.save({"model": state, "epoch": i} if i < 2 else state, path)
        states.append(state)
        paths.append(path)
    return {"states": states, "paths": paths}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(BATCH, 256, 64, 64, generator=generator)
    images = torch.rand(BATCH, 1, 256, 256, generator=generator)
    return embeddings, Conditions(images=images, noise_seeds=torch.tensor([5, 6]))


def _ensemble(stage2, paths) -> SnapshotEnsemble:
    return SnapshotEnsemble(copy.deepcopy(stage2), paths).eval()


def test_samples_are_split_between_members_and_each_members_own(stage2, snapshots, inputs):
    embeddings, conditions = inputs
    ensemble = _ensemble(stage2, snapshots["paths"][:2])
    assert isinstance(ensemble, MaskSamplingNetwork) and ensemble.num_members == 2
    assert ensemble.samples_per_member(5) == [3, 2]
    with torch.no_grad():
        samples = ensemble.sample_logits(embeddings, conditions, 5)
        own = [
            member.draw_samples(embeddings, ensemble.member_conditions(conditions, k), count)
            for k, (member, count) in enumerate(zip(ensemble.members, [3, 2]))
        ]
    assert samples.shape == (BATCH, 5, *ensemble.backbone.mask_size)
    assert torch.equal(samples[:, :3], own[0]) and torch.equal(samples[:, 3:], own[1])
    assert not torch.allclose(own[0][:, :2], own[1], atol=1e-3)  # two snapshots: two prompt distributions


def test_members_without_samples_are_not_called(stage2, snapshots, inputs):
    embeddings, conditions = inputs
    ensemble = _ensemble(stage2, snapshots["paths"])
    assert ensemble.samples_per_member(2) == [1, 1, 0] and ensemble.samples_per_member(7) == [3, 2, 2]

    def refuse(*args):
        raise AssertionError("a member with no samples was called")

    ensemble.members[2].draw_samples = refuse
    with torch.no_grad():
        assert ensemble.sample_logits(embeddings, conditions, 2).shape == (BATCH, 2, 256, 256)


def test_members_draw_with_their_own_deterministic_seeds(stage2, snapshots, inputs):
    embeddings, conditions = inputs
    seeds = conditions.noise_seeds
    assert SnapshotEnsemble.member_conditions(conditions, 0) is conditions
    member_seeds = [SnapshotEnsemble.member_conditions(conditions, k).noise_seeds for k in (1, 2)]
    assert all(not torch.equal(s, seeds) and (s >= 0).all() for s in member_seeds)
    assert not torch.equal(member_seeds[0], member_seeds[1])
    assert torch.equal(SnapshotEnsemble.member_conditions(conditions, 1).noise_seeds, member_seeds[0])
    assert not set(member_seeds[0].tolist()) & set(range(100))  # no member reuses another small seed's draws
    assert SnapshotEnsemble.member_conditions(Conditions(), 1).noise_seeds is None

    same = _ensemble(stage2, [snapshots["paths"][0]] * 2)  # one snapshot twice: only the seeds differ
    with torch.no_grad():
        samples = same.sample_logits(embeddings, conditions, 4)
        again = same.sample_logits(embeddings, conditions, 4)
    assert torch.equal(samples, again)
    assert not torch.allclose(samples[:, :2], samples[:, 2:], atol=1e-3)


def test_one_snapshot_is_the_network_itself(stage2, snapshots, inputs):
    embeddings, conditions = inputs
    network = copy.deepcopy(stage2)
    network.load_state_dict(snapshots["states"][0])
    ensemble = _ensemble(stage2, snapshots["paths"][0])  # a single path is one snapshot
    with torch.no_grad():
        samples = ensemble.sample_logits(embeddings, conditions, 3)
        assert torch.equal(samples, network.sample_logits(embeddings, conditions, 3))
    assert ensemble.capabilities == stage2.capabilities


def test_nested_and_bare_state_dicts_both_load(stage2, snapshots):
    ensemble = _ensemble(stage2, snapshots["paths"][1:])  # {"model": state} and a bare state
    key = "prompt_generator.head.conv.weight"
    for member, state in zip(ensemble.members, snapshots["states"][1:]):
        assert torch.equal(member.state_dict()[key], state[key])
    assert not torch.equal(ensemble.members[0].state_dict()[key], ensemble.members[1].state_dict()[key])


def test_snapshots_with_different_backbones_are_refused_naming_the_file(stage2, snapshots, tmp_path):
    state = {k: v.clone() for k, v in snapshots["states"][1].items()}
    state["backbone.mask_decoder.iou_token.weight"] += 1e-3
    other = tmp_path / "other_backbone.pt"
    torch.save({"model": state}, other)
    with pytest.raises(InputError, match="backbone weights differ.*iou_token") as err:
        SnapshotEnsemble(copy.deepcopy(stage2), [snapshots["paths"][0], other])
    assert err.value.path == str(other) and str(snapshots["paths"][0]) in str(err.value)


def test_bad_checkpoints_are_clear_errors(stage2, snapshots, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(InputError, match="checkpoint not found") as err:
        SnapshotEnsemble(copy.deepcopy(stage2), [snapshots["paths"][0], missing])
    assert err.value.path == str(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read as a PyTorch state dict") as err:
        SnapshotEnsemble(copy.deepcopy(stage2), [garbage])
    assert err.value.path == str(garbage)
    pickled = pickled_checkpoint(tmp_path / "pickled.pt", snapshots["states"][0])
    with pytest.raises(InputError, match=r"needs pickle to load \(it holds conftest.NotAWeight\).*is refused") as err:
        SnapshotEnsemble(copy.deepcopy(stage2), [snapshots["paths"][0], pickled])
    assert err.value.path == str(pickled)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in snapshots["states"][0].items() if not k.startswith("prompt_generator.")}, partial)
    with pytest.raises(InputError, match=r"is not a state dict of P2Sam.*missing key\(s\), e.g. prompt_generator"):
        SnapshotEnsemble(copy.deepcopy(stage2), [partial])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        SnapshotEnsemble(copy.deepcopy(stage2), [])


def test_state_dict_holds_the_backbone_once_and_the_ensemble_moves_as_one(stage2, snapshots):
    ensemble = _ensemble(stage2, snapshots["paths"][:2])
    state = ensemble.state_dict()
    assert any(k.startswith("backbone.") for k in state)
    assert any(k.startswith("members.1.prompt_generator.") for k in state)
    assert not any(k.startswith("members.") and ".backbone." in k for k in state)
    assert all(member.backbone is ensemble.backbone for member in ensemble.members)
    assert len(list(ensemble.parameters())) == len(list(ensemble.backbone.parameters())) + sum(
        len(list(m.parameters())) for m in ensemble.members
    )

    copied = copy.deepcopy(ensemble)
    assert all(member.backbone is copied.backbone for member in copied.members)
    copied.load_state_dict(state, strict=True)
    copied.to(torch.float64)
    weight = copied.backbone.mask_decoder.iou_token.weight
    assert weight.dtype == torch.float64 and copied.members[1].backbone.mask_decoder.iou_token.weight is weight
    assert copied.members[1].prompt_generator.head.conv.weight.dtype == torch.float64
    copied.train()
    assert copied.members[0].training and not copied.backbone.image_encoder.training  # the frozen encoder stays eval


def test_eval_forward_returns_one_map_and_training_is_refused(stage2, snapshots, monkeypatch):
    ensemble = _ensemble(stage2, snapshots["paths"][:2])
    image = torch.rand(1, 1, 96, 80)
    embeddings = torch.randn(1, 256, 64, 64)
    encoded = []
    monkeypatch.setattr(ensemble.backbone, "encode", lambda x: encoded.append(x.shape) or embeddings)  # no encoder pass
    with torch.no_grad():
        assert ensemble(image).shape == (1, 1, 96, 80)  # the prompt generators read the image forward is given
    assert encoded == [(1, 1, 96, 80)]  # one encoding for both snapshots
    with pytest.raises(NotImplementedError, match="inference only"):
        ensemble.training_outputs(embeddings, Conditions(), torch.zeros(1, 1, 256, 256))
    with pytest.raises(NotImplementedError, match="inference only"):
        ensemble.compute_training_outputs(embeddings, Conditions(), torch.zeros(1, 1, 256, 256))
