"""CycleGAN (unpaired A <-> B translation): the networks, the local round with both
domains and with one, the server's per-translator average, the federated run on the real
CT and MR volumes with `fedsynth translate`, and the DP refusal.

The toy domains are a slice set and the intensity-inverted copy of *other* patients'
slices (unpaired), where the true mapping A -> B is known: x -> -x in [-1, 1] units.
The simulation goes through Flower's real simulation engine (`fedsynth simulate`); the
volumes are ../shared/data/ct-volumes (skipped, with the reason, where it is absent).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.models import check_dp_discriminator
from fedsynth.privacy import PrivacyError
from fedsynth.models.cyclegan import train_round_cycle
from fedsynth.models.training import BatchSource, make_optimizers
from fedsynth.engine.strategy import GeneratorFedAvg
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.engine.records import ARRAYS, HOSPITAL, METRICS
from fedsynth.runs.rundir import RunDir
from fedsynth.data.sliceset import SliceSet

from .conftest import CT_VOLUMES, make_slices, require

runner = CliRunner()


def _cyclegan(size: int = 32, width: int = 8, **train: object):  # type: ignore[no-untyped-def]
    cfg = RunConfig.from_overrides({"model.name": "cyclegan", "model.width": width, "data.image-size": size,
                                    **{f"train.{k}": v for k, v in train.items()}})
    return cfg, *build_gan(cfg.model, image_size=size, num_classes=1)


def _toy_domains() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A for training, B for training = other patients inverted, A held out)."""
    x = torch.from_numpy(make_slices(n_patients=30, per_patient=4, size=32, seed=1).as_float())
    return x[:48], -x[48:96], x[96:]


def _source(x: torch.Tensor, seed: int) -> BatchSource:
    return BatchSource(x, torch.zeros(len(x)), batch_size=16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [32, 64, 256])
def test_translators_keep_the_slice_shape_and_each_domain_has_a_patchgan(size: int) -> None:
    _, gen, disc = _cyclegan(size, width=4)
    x = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        for direction in ("a2b", "b2a"):
            y = gen(None, x, direction)
            assert y.shape == x.shape and y.abs().max() <= 1
        assert disc(x, "a").adv.shape == disc(x, "b").adv.shape and disc(x, "a").adv.shape[1] > 1
    assert gen.latent_dim == 0 and {n.split(".")[0] for n, _ in gen.named_parameters()} == {"a2b", "b2a"}
    with pytest.raises(ValueError, match="a2b or b2a"):
        gen(None, x, "ab")


def test_cycle_returns_close_to_a_and_learns_the_known_inversion() -> None:
    """Trained unpaired on slices (A) and other patients' inverted slices (B), CycleGAN
    brings held-out A -> B -> A back close to A, and A -> B close to the true inverse,
    much closer than leaving the slice as it is."""
    torch.manual_seed(0)
    cfg, gen, disc = _cyclegan(**{"local-steps": 300, "batch-size": 16})
    train_a, train_b, held_a = _toy_domains()
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    stats = train_round_cycle(gen, disc, opt_g, opt_d, _source(train_a, 0), _source(train_b, 1), cfg.train,
                              generator=torch.Generator().manual_seed(2))
    assert stats.weight_a2b == len(train_b) and stats.weight_b2a == len(train_a)
    gen.eval()
    with torch.no_grad():
        to_b = gen(None, held_a, "a2b")
        back = gen(None, to_b, "b2a")
    untouched = (held_a - (-held_a)).abs().mean().item()  # the identity map's error
    assert (to_b - (-held_a)).abs().mean().item() < 0.4 * untouched, "A -> B approaches the true inversion"
    assert (back - held_a).abs().mean().item() < 0.1, "A -> B -> A returns close to A (mean error < 5% of range)"


def test_a_hospital_with_one_domain_trains_only_the_translator_into_it() -> None:
    """With slices of A only, nothing can judge A -> B against real B: that translator is
    not updated and its weight is 0; B -> A learns to map translations back to real A."""
    cfg, gen, disc = _cyclegan(**{"local-steps": 3, "batch-size": 8})
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    stats = train_round_cycle(gen, disc, opt_g, opt_d, _source(_toy_domains()[0], 0), None, cfg.train,
                              generator=torch.Generator().manual_seed(0))
    after = gen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("a2b.")), "A -> B untouched"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("b2a.")), "B -> A trained"
    assert stats.weight_a2b == 0 and stats.weight_b2a == 48
    assert all(p.requires_grad for p in gen.parameters()), "the frozen half is unfrozen again"
    metrics = stats.as_metrics()
    assert metrics["weight-a2b"] == 0 and "l1" in metrics


def test_with_shared_discriminators_a_one_domain_hospital_trains_both_translators() -> None:
    """Given the PatchGANs from the server (federation.aggregate-discriminator), a hospital
    holding only A judges A -> B with the received D_B: both translators train, D_B (no
    real B here) does not, and its weight is 0."""
    cfg, gen, disc = _cyclegan(**{"local-steps": 3, "batch-size": 8})
    gen_before = {k: v.clone() for k, v in gen.state_dict().items()}
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    stats = train_round_cycle(gen, disc, opt_g, opt_d, _source(_toy_domains()[0], 0), None, cfg.train,
                              generator=torch.Generator().manual_seed(0), shared_judges=True)
    assert all(not torch.equal(gen_before[k], v) for k, v in gen.state_dict().items() if k.endswith("out.weight"))
    assert all(torch.equal(disc_before[k], v) for k, v in disc.state_dict().items() if k.startswith("b."))
    assert any(not torch.equal(disc_before[k], v) for k, v in disc.state_dict().items() if k.startswith("a."))
    assert (stats.weight_a2b, stats.weight_b2a, stats.weight_a, stats.weight_b) == (48, 48, 48, 0)


def _reply(node: int, arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    """A hospital's reply as the SuperLink delivers it (built by hand: the strategy is
    called directly, without a running Flower engine)."""
    content = RecordDict({HOSPITAL: ConfigRecord({"name": f"hospital-{node}"}),
                          ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          METRICS: MetricRecord(metrics)})
    return Message(metadata=Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                                     reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                                     message_type="train"), content=content)


def test_server_averages_each_translator_over_the_hospitals_holding_its_target_domain() -> None:
    shapes = {"generator.a2b.w": (2,), "generator.b2a.w": (2,), "discriminator.b.w": (2,)}
    strategy = GeneratorFedAvg(expected_shapes=shapes)
    strategy.current = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}

    def weights(a2b: float, b2a: float, d_b: float) -> dict[str, np.ndarray]:
        return {"generator.a2b.w": np.full(2, a2b, np.float32), "generator.b2a.w": np.full(2, b2a, np.float32),
                "discriminator.b.w": np.full(2, d_b, np.float32)}

    def counts(a: float, b: float) -> dict[str, float]:
        return {"num-examples": a + b, "weight-a2b": b, "weight-b2a": a, "weight-a": a, "weight-b": b}

    replies = [_reply(1, weights(9.0, 1.0, 9.0), **counts(30, 0)),  # only A: its A -> B and D_B untrained
               _reply(2, weights(2.0, 9.0, 2.0), **counts(0, 20)),  # only B
               _reply(3, weights(4.0, 3.0, 4.0), **counts(20, 20))]  # both
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert np.allclose(arrays["generator.a2b.w"].numpy(), (2 * 20 + 4 * 20) / 40), "A -> B: hospitals with real B"
    assert np.allclose(arrays["generator.b2a.w"].numpy(), (1 * 30 + 3 * 20) / 50), "B -> A: hospitals with real A"
    assert np.allclose(arrays["discriminator.b.w"].numpy(), 3.0), "D_B: hospitals with real B"
    # A translator no hospital could train keeps the global weights, server momentum or not.
    arrays, _ = strategy.aggregate_train(2, [replies[0]])
    assert np.allclose(arrays["generator.a2b.w"].numpy(), 0.0)
    momentum = GeneratorFedAvg(expected_shapes=shapes, server_step=(0.9, 1.0, set(shapes)))
    momentum.current = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    arrays, _ = momentum.aggregate_train(1, replies)  # every half trained: velocity builds up
    momentum.current = {k: arrays[k].numpy() for k in shapes}
    arrays, _ = momentum.aggregate_train(2, [replies[0]])  # only A: A -> B untrained
    assert np.allclose(arrays["generator.a2b.w"].numpy(), momentum.current["generator.a2b.w"])
    assert not np.allclose(arrays["generator.b2a.w"].numpy(), momentum.current["generator.b2a.w"])


def _ct_and_mr(tmp_path: Path) -> Path:
    """The real CT and MR volumes in one sub-folder each, so each slice's site is its
    modality, as a slice set (two patients, masks kept)."""
    ct = require(CT_VOLUMES)
    for site, volume, seg in (("ct", "example_ct_sm", "example_seg"), ("mr", "example_mr_sm", "example_seg_mr")):
        folder = tmp_path / "volumes" / site
        folder.mkdir(parents=True)
        (folder / f"{site}.nii.gz").symlink_to(ct / f"{volume}.nii.gz")
        (folder / f"{site}_seg.nii.gz").symlink_to(ct / f"{seg}.nii.gz")
    out = tmp_path / "ct-mr.npz"
    result = runner.invoke(app, ["prepare", str(tmp_path / "volumes"), "--out", str(out), "--size", "32",
                                 "--keep-masks", "--holdout", "0", "--validation", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_ct_and_mr_hospitals_train_cyclegan_and_translate_ct_to_mr_and_back(tmp_path: Path) -> None:
    data = _ct_and_mr(tmp_path)
    slices = SliceSet.load(data)
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--partition", "by-site",
                                 "--rounds", "2", "--local-steps", "3", "--out", str(out),
                                 "--set", "simulation.validation=0", "--set", "model.name=cyclegan",
                                 "--set", "model.width=8", "--set", "train.batch-size=8",
                                 "--set", "output.grid-per-class=4"])
    assert result.exit_code == 0, result.output
    assert "A = ct, B = mr" in result.output and "no hospital holds both domains" in result.output
    run = RunDir(out)
    cfg = run.load_config()
    assert (cfg.data.domain_a, cfg.data.domain_b) == ("ct", "mr"), "the two sites, found in the slice set"
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    weights = {name: (m["weight-a2b"], m["weight-b2a"]) for name, m in rounds[-1]["hospitals"].items()}
    assert sorted(weights.values()) == [(0, 30), (20, 0)], "each site trains the translator into its modality"
    assert (out / "samples" / "round-0002.png").exists(), "the server translates the preview set each round"

    for direction, source, target in (("a2b", "ct", "mr"), ("b2a", "mr", "ct")):
        translated = tmp_path / f"{direction}.npz"
        result = runner.invoke(app, ["translate", "--run", str(out), "--direction", direction, "--data", str(data),
                                     "--out", str(translated)])
        assert result.exit_code == 0, result.output
        moved = SliceSet.load(translated)
        original = slices.subset(slices.site == source)
        assert moved.images.shape == original.images.shape and not np.array_equal(moved.images, original.images)
        assert set(moved.site) == {target} and np.array_equal(moved.masks, original.masks)
        assert moved.meta["translated"]["from"] == source and moved.meta["translated"]["round"] == 2
        assert (tmp_path / f"{direction}-grid.png").exists()
    # Translations are real anatomy: the audit refuses them as a synthetic set.
    real = make_slices(n_patients=8, per_patient=2, size=32).save(tmp_path / "real.npz")
    result = runner.invoke(app, ["audit", "--data", str(real), "--synthetic", str(tmp_path / "a2b.npz"),
                                 "--out", str(tmp_path / "audit")])
    assert result.exit_code != 0 and "translated by a cyclegan run" in result.output
    # The run draws nothing from noise, and another image size is refused by name.
    result = runner.invoke(app, ["sample", "--run", str(out), "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "fedsynth translate" in result.output
    big = make_slices(n_patients=2, per_patient=2, size=64, sites=("ct",)).save(tmp_path / "big.npz")
    result = runner.invoke(app, ["translate", "--run", str(out), "--data", str(big), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code != 0 and "64 px" in result.output

    # Shared PatchGANs: each site also judges the translation out of its modality, so
    # both translators train everywhere, and each PatchGAN is weighted by its own domain.
    shared = tmp_path / "shared"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--partition", "by-site",
                                 "--rounds", "1", "--local-steps", "2", "--out", str(shared),
                                 "--set", "simulation.validation=0", "--set", "model.name=cyclegan",
                                 "--set", "model.width=8", "--set", "train.batch-size=8",
                                 "--set", "federation.aggregate-discriminator=true"])
    assert result.exit_code == 0, result.output
    assert "no hospital holds both domains" not in result.output
    metrics = RunDir(shared).read_rounds()[0]["hospitals"].values()
    assert sorted((m["weight-a2b"], m["weight-b2a"], m["weight-a"], m["weight-b"]) for m in metrics) == [
        (20, 20, 0, 20), (30, 30, 30, 0)]


def test_domains_must_be_named_when_the_field_has_more_than_two_values(tmp_path: Path) -> None:
    data = make_slices(n_patients=6, per_patient=2, sites=("s1", "s2", "s3")).save(tmp_path / "s.npz")
    args = ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1", "--set", "model.name=cyclegan"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r1")])
    assert result.exit_code != 0 and "data.domain-a" in result.output and "s1, s2, s3" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r2"), "--set", "data.domain-a=s1",
                                 "--set", "data.domain-b=s9"])
    assert result.exit_code != 0 and "'s9'" in result.output


def test_dp_is_refused_for_cyclegan_with_the_reason(tmp_path: Path) -> None:
    _, _, disc = _cyclegan()
    with pytest.raises(PrivacyError, match="cycle-consistency and identity losses"):
        check_dp_discriminator(disc)
    data = make_slices(n_patients=6, per_patient=2, sites=("ct", "mr")).save(tmp_path / "s.npz")
    refused = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1",
                                  "--out", str(tmp_path / "dp"), "--set", "model.name=cyclegan",
                                  "--set", "dp.target-epsilon=5"])
    assert refused.exit_code != 0 and "cyclegan cannot train under DP-SGD" in refused.output
    assert not (tmp_path / "dp" / "checkpoints").exists(), "nothing trained"
    with pytest.raises(ValueError, match="cyclegan trains with bce or hinge"):
        RunConfig.from_overrides({"model.name": "cyclegan", "train.loss": "wgan-gp"})
    with pytest.raises(ValueError, match="client-dp-noise-multiplier: not with cyclegan"):
        RunConfig.from_overrides({"model.name": "cyclegan", "federation.client-dp-noise-multiplier": 1.0})


def test_validation_scores_translations_only_where_both_domains_are_held(tmp_path: Path) -> None:
    """A hospital with validation slices of both domains scores each round's translators
    (Fréchet distance of translated slices to the other domain's, and the cycle error);
    one whose validation slices are of one domain cannot, and says how many it holds."""
    from fedsynth.client.hospital import HospitalSite, score_validation
    from fedsynth.data.sliceset import VALIDATION, with_validation
    from fedsynth.core.weights import exchanged_state

    cfg, gen, _ = _cyclegan(**{"seed": 0})
    cfg = cfg.with_overrides({"data.domain-a": "ct", "data.domain-b": "mr"})
    state = exchanged_state(gen)
    both = with_validation(make_slices(n_patients=20, per_patient=2, sites=("ct", "mr")), 0.3, seed=0)
    site = HospitalSite("h", both.save(tmp_path / "both.npz"), tmp_path / "state")
    score = score_validation(site, cfg, state)
    assert score["val-n"] == int((both.split == VALIDATION).sum())
    assert np.isfinite(score["val-fd"]) and 0 <= score["val-cycle"] <= 2
    one = with_validation(make_slices(n_patients=20, per_patient=2, sites=("ct",)), 0.3, seed=0)
    site = HospitalSite("h", one.save(tmp_path / "one.npz"), tmp_path / "state")
    score = score_validation(site, cfg, state)
    assert "val-fd" not in score and score["val-n"] == int((one.split == VALIDATION).sum())
