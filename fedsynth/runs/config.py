"""The one typed run configuration: defaults, YAML, CLI overrides and Flower run config,
validated against the model families (each family checks the keys it cares about)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedsynth.core.errors import ConfigError
from fedsynth.data.partition import SPEC_HELP, PartitionError, parse_spec
from fedsynth.models.augment import parse_policy as parse_augmentation
from fedsynth.models.family import EMBEDDING
from fedsynth.models.registry import FAMILIES, get_family, presets

if TYPE_CHECKING:
    from fedsynth.models.family import Family

__all__ = [
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "SimulationConfig",
    "TrainConfig",
    "parse_overrides",
]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _on_off(value: Any) -> Any:
    """YAML reads ``on`` and ``off`` (in a file or ``--set KEY=off``) as booleans: back to the words."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        validate_assignment=True,
        frozen=False,
    )


class DataConfig(_Section):
    """What the generator produces. Filled from the slice set in simulation; set by
    the coordinator in a deployment, where the server never sees data."""

    image_size: Literal[32, 64, 128, 256] = Field(
        64, description="slice side in pixels (256: on a GPU in practice; CPU runs, slowly)"
    )
    class_names: str = Field("", description="comma-separated class names, in label order")

    mask_labels: str = Field(
        "",
        description="pix2pix: comma-separated label values of the masks (e.g. 5,1 for liver and spleen), for "
        "the server's round grids from the shape model; filled from the slice set in simulation",
    )

    domain_field: Literal["site", "class"] = Field(
        "site",
        description="cyclegan: the slice-set field that names each slice's domain (site: the acquiring "
        "site, e.g. the folder a volume sat in; class: the class name)",
    )
    domain_a: str = Field(
        "",
        description="cyclegan: the value of data.domain-field that is domain A (e.g. ct); filled from the "
        "slice set in simulation when the field has exactly two values",
    )
    domain_b: str = Field(
        "", description="cyclegan: the value of data.domain-field that is domain B (e.g. mr)"
    )

    @property
    def classes(self) -> list[str]:
        return [c for c in self.class_names.split(",") if c]

    @property
    def num_classes(self) -> int:
        """Rows of the networks' class embeddings: the classes, at least one."""
        return max(1, len(self.classes))

    @property
    def mask_values(self) -> list[int]:
        return [int(v) for v in self.mask_labels.split(",") if v.strip()]

    @field_validator("mask_labels")
    @classmethod
    def _check_mask_labels(cls, value: str) -> str:
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        if any(not v.isdigit() or int(v) > 255 for v in parts):
            raise ValueError("must be comma-separated label values 0-255, e.g. 5,1")
        return ",".join(parts)


class ModelConfig(_Section):
    """Which GAN family and how large."""

    name: str = Field(
        "cdcgan",
        description="model family (see `fedsynth models`; a preset such as medscangan expands to its family)",
    )
    latent_dim: int = Field(64, ge=1, le=1024, description="noise vector length")
    width: int = Field(32, ge=4, le=512, description="base channel count")
    conditioning: Literal["projection", "ac", "none"] = Field(
        "projection",
        description="class conditioning of the discriminator: projection head, "
        "auxiliary classifier, or none (unconditional)",
    )
    upsample: Literal["transpose", "nearest"] = Field(
        "transpose",
        description="cdcgan: how the generator doubles the side: DCGAN's transposed convolution, or "
        "nearest-neighbour upsampling + 3x3 convolution (no checkerboard; not yet better on all data "
        "sets: benchmarks/recipe_ablation.py)",
    )
    d_readout: Literal["spatial", "mean"] = Field(
        "spatial",
        description="cdcgan: how the discriminator reads its last 4x4 feature map: spatial (every position "
        "weighed on its own, as DCGAN's final 4x4 convolution does: the layout of the image counts) or "
        "mean (averaged over positions: it judges a bag of local patches, and the generator learns to "
        "tile one motif across the image; the default before it was measured, BENCHMARKS.md)",
    )
    spectral_norm: bool = Field(
        True,
        description="wgan-gp: spectral normalisation on the critic's layers (not under DP: Opacus "
        "has no per-sample gradient through it)",
    )
    residual: bool = Field(True, description="wgan-gp: residual blocks in generator and critic")
    mapping_layers: int = Field(4, ge=1, le=8, description="stylegan2-lite: layers of the mapping network")
    mbstd_group: int = Field(
        4,
        ge=0,
        le=32,
        description="stylegan2-lite: minibatch standard deviation group size in D (0: off; required off "
        "under DP)",
    )

    merf_frequencies: int = Field(
        1000,
        ge=16,
        le=20000,
        description="dp-merf: random Fourier frequencies of the feature map (each hospital releases 2x this "
        "numbers per class; more: a finer match, and more noise in total under DP)",
    )
    merf_bandwidth: float = Field(
        0.5,
        gt=0,
        description="dp-merf: Gaussian kernel width per pixel (the width is this x sqrt(pixels), pixels in "
        "[-1, 1]); fixed, never estimated from the private slices",
    )
    merf_fit_steps: int = Field(
        2000, ge=1, description="dp-merf: the server's generator steps fitting the released embedding"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown model family (choose from {', '.join([*FAMILIES, *presets()])})")
        return value

    @property
    def family(self) -> Family:
        """The family this section names (``fedsynth.models``)."""
        return get_family(self.name)


class TrainConfig(_Section):
    """The local GAN round each hospital runs."""

    local_steps: int = Field(50, ge=1, description="discriminator+generator steps per round per hospital")
    batch_size: int = Field(
        32,
        ge=2,
        description="real slices per step (32: twice the steps of 64 in the same time, "
        "which bought more than the larger batch on 2 CPU cores)",
    )
    lr_g: float = Field(2e-4, gt=0, description="generator learning rate (Adam)")
    lr_d: float = Field(2e-4, gt=0, description="discriminator learning rate (Adam)")
    beta1: float = Field(
        0.5, ge=0, lt=1, description="Adam's first-moment decay, both networks (0.5: DCGAN's choice)"
    )
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam's second-moment decay, both networks")
    loss: Literal["auto", "hinge", "bce", "wgan-gp"] = Field(
        "auto",
        description="adversarial loss: hinge, non-saturating BCE, or Wasserstein with gradient "
        "penalty (auto: wgan-gp for the wgan-gp family, bce (logistic) for stylegan2-lite, pix2pix and "
        "cyclegan, hinge for the others)",
    )
    n_critic: int = Field(
        0,
        ge=0,
        le=100,
        description="discriminator (critic) steps per generator step (0: 5 for the wgan-gp loss, else 1); "
        "train.local-steps counts generator steps; under DP every one is charged (Bie, Kamath and Zhang, "
        "TMLR 2023, found about 50 per generator step best for DP-SGD GANs)",
    )
    gp_weight: float = Field(10.0, ge=0, description="wgan-gp: gradient penalty weight lambda")
    r1_gamma: float = Field(
        0.1,
        ge=0,
        description="stylegan2-lite: R1 penalty weight gamma on real images (0: off; required off under DP)",
    )
    l1_weight: float = Field(
        100.0,
        ge=0,
        description="pix2pix: weight lambda of the L1 distance between the generated and the real slice "
        "of the same mask in the generator loss",
    )
    cycle_weight: float = Field(
        10.0,
        ge=0,
        description="cyclegan: weight lambda of the cycle-consistency L1 (A -> B -> A and B -> A -> B)",
    )
    identity_weight: float = Field(
        0.5,
        ge=0,
        description="cyclegan: identity L1 (G_AB(b) = b, G_BA(a) = a) as a fraction of "
        "train.cycle-weight (0.5, as in the CycleGAN code)",
    )
    r1_interval: int = Field(16, ge=1, le=64, description="stylegan2-lite: lazy R1, every this many D steps")
    augment: str = Field(
        "translation,cutout:0.5",
        description="DiffAugment policy applied to every image the discriminator sees, real and "
        "generated (comma-separated: color, translation, cutout, each optionally with the probability of "
        "applying it to an image, e.g. cutout:0.5; none: off). color is off by default: with "
        "it the generator drifted to over-bright slices. Cutout on every image leaked into the "
        "generator as dark holes, so the default cuts half the images",
    )
    diversity_weight: float = Field(
        0.1,
        ge=0,
        description="mode-seeking term (MSGAN) in the generator loss against one-image-per-class "
        "collapse; reads no real data (0: off)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when present, else CPU"
    )
    mixed_precision: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="bfloat16 autocast in training steps: auto = on a CUDA GPU only (not under DP, whose "
        "per-sample clipping stays in float32); on also forces it on the CPU",
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads (0: the cores this process may use, its affinity capped by its "
        "container's CPU quota; in simulation, the cores planned for each hospital)",
    )
    seed: int = Field(0, ge=0, description="base seed; each hospital and round derive theirs")
    init_from: str = Field(
        "",
        description="warm start: a run directory (its last round) or a checkpoint whose generator every "
        "hospital starts from, trained on data you declare public; recorded with its hash in the privacy "
        "ledger and the audit report, charged nothing, refused when trained on this run's own slices",
    )

    _family: str = PrivateAttr(default="cdcgan")  # model.name, set by RunConfig (resolves "auto")

    @property
    def family(self) -> Family:
        """The family of the run this section belongs to (cdcgan for a section on its own)."""
        return get_family(self._family)

    @property
    def critic_steps_per_step(self) -> int:
        """Discriminator updates per generator update."""
        return self.n_critic or (5 if self.objective == "wgan-gp" else 1)

    @property
    def objective(self) -> str:
        """The loss actually trained: ``auto`` is the family's default loss."""
        if self.loss != "auto":
            return self.loss
        return self.family.default_loss

    @property
    def critic_steps(self) -> int:
        """Discriminator updates per local round: under DP, the steps charged to the ledger."""
        return self.local_steps * self.critic_steps_per_step

    @field_validator("init_from")
    @classmethod
    def _absolute_init(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve()) if value else ""

    @field_validator("augment")
    @classmethod
    def _check_augment(cls, value: str) -> str:
        if value in ("", "none"):
            return "none"
        parse_augmentation(value)  # raises ValueError naming the bad item
        return value


class FederationConfig(_Section):
    """Rounds and aggregation on the server."""

    rounds: int = Field(5, ge=1, description="federated rounds")
    min_hospitals: int = Field(1, ge=1, description="fewest hospitals whose updates make a round count")
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="share of connected hospitals asked each round"
    )
    aggregate_discriminator: bool = Field(
        False,
        description="also average discriminators (by default each stays at its hospital)",
    )
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies")
    time_budget: float = Field(
        0.0,
        ge=0,
        description="stop after the round during which this many seconds of training have passed "
        "(0: run all rounds); counted from the start of this invocation, so a resumed run gets it afresh",
    )
    server_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="FedAvgM (Hsu et al. 2019): momentum of the server's step along the averaged "
        "update (0: plain FedAvg)",
    )
    server_lr: float = Field(
        1.0, gt=0, le=10, description="server step size on the averaged update (FedAvgM)"
    )
    lr_scaling: Literal["sqrt-hospitals", "none"] = Field(
        "none",
        description="sqrt-hospitals: each hospital's Adam learning rates (train.lr-g and, to keep the two "
        "in balance, train.lr-d) are multiplied by the square root of the number of hospitals asked in "
        "the round. Averaging K hospitals' generators makes each round's update one over a K times "
        "larger batch, and Adam's square-root rule (Malladi et al., NeurIPS 2022) scales the step with "
        "it; one hospital keeps the rates as set. none: the rates as set. Measured on three data sets "
        "at 1,350 federated steps (BENCHMARKS.md): better on two, worse on the third, so not the default",
    )
    generator_average: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="images are drawn from the server's running average of the global generator over "
        "rounds, with this decay per round (0: from the last round's generator itself); over the first "
        "rounds (5 at 0.7) it is the average of every round so far weighted by round number. Kept in "
        "each checkpoint; the hospitals go on training from the generator itself (they receive the average "
        "only to score it, when validation-score is on). On three "
        "data sets it lowered FD against the last round's generator and evened out its round-to-round "
        "swings (BENCHMARKS.md)",
    )
    validation_score: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="each round, hospitals score the new generator on their validation slices (only the "
        "score leaves); auto: on unless DP (dp.* or client-level) is on, since the score is released "
        "without noise",
    )
    max_update_norm: float = Field(
        3.0,
        ge=0,
        description="reject a hospital's update whose change ||update - global|| exceeds this multiple of "
        "the global model's norm (0: no bound)",
    )
    client_dp_noise_multiplier: float = Field(
        0.0,
        ge=0,
        description="client-level DP on the server (0: off): each hospital's update is clipped to "
        "client-dp-clip and the average noised; protects which hospitals took part, not patients",
    )
    client_dp_clip: float = Field(
        1.0, gt=0, description="client-level DP: L2 clip of one hospital's model update"
    )
    client_dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="client-level DP: delta of the reported epsilon"
    )
    secure_aggregation: Annotated[Literal["on", "off"], BeforeValidator(_on_off)] = Field(
        "off",
        description="on: Flower's SecAgg+ (Bell et al. 2020); each hospital masks its generator update so "
        "that the server learns only the weighted sum of the round's updates, never one hospital's. The "
        "server then cannot check updates one by one: each hospital checks and bounds its own, the server "
        "checks the aggregate (see docs: privacy). Needs 2 or more hospitals a round; not with "
        "client-level DP, dp-merf or cyclegan",
    )


class DPConfig(_Section):
    """DP-SGD on each hospital's discriminator (the only network that sees real images).

    Off unless ``target-epsilon`` or ``noise-multiplier`` is set. With a target, the
    noise multiplier is chosen up front so that ``federation.rounds`` x
    ``train.local-steps`` steps at this hospital spend at most the target (RDP
    accountant), and a hospital declines any round that would exceed it.
    """

    target_epsilon: float = Field(
        0.0, ge=0, description="privacy budget per hospital over the whole run (0: no budget)"
    )
    delta: float = Field(
        0.0, ge=0, lt=1, description="delta (0: min(1e-5, 1/(10 N)), N = privacy units at the hospital)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm C")
    noise_multiplier: float = Field(
        0.0, ge=0, description="fixed noise multiplier sigma (0: chosen from target-epsilon)"
    )
    on_budget_exhausted: Literal["continue", "stop"] = Field(
        "continue",
        description="server policy when a hospital declines for budget: carry on with the others, or stop "
        "the run",
    )

    @property
    def enabled(self) -> bool:
        return self.target_epsilon > 0 or self.noise_multiplier > 0


class OutputConfig(_Section):
    """Where the run directory is and what goes into it."""

    run_dir: str = Field("runs/default", description="run directory")
    grid_per_class: int = Field(8, ge=1, le=32, description="samples per class in round grids")
    resume: bool = Field(False, description="continue from the last checkpoint in run-dir")
    preview: str = Field(
        "",
        description="cyclegan: a slice set (.npz) whose domain A and B slices the server translates for each "
        "round's grid; simulate writes one from the training slices; in a deployment give a set that may "
        "be shown (empty: no round grids, the server holds no slices)",
    )
    tensorboard: bool = Field(
        True,
        description="write TensorBoard event files to RUN/tensorboard as rounds finish (the figures of "
        "rounds.jsonl and the privacy ledger, round grids, the config): tensorboard --logdir RUN",
    )
    mlflow: str = Field(
        "",
        description="also log to MLflow: a local folder (kept as FOLDER/mlflow.db and FOLDER/artifacts) or "
        "a tracking URI (http://host:5000, sqlite:///path.db); needs pip install 'fedsynth[mlflow]' "
        "(empty: off)",
    )
    mlflow_experiment: str = Field(
        "fedsynth", min_length=1, description="MLflow experiment the run is logged in (output.mlflow)"
    )

    @field_validator("mlflow")
    @classmethod
    def _absolute_store(cls, value: str) -> str:
        """A local store (a folder, ``file:``, a relative ``sqlite:///``) is made absolute
        where the config is written (the command's working directory), not where the
        ServerApp or a later ``fedsynth audit`` happens to run."""
        value = value.strip()
        if value.startswith("file:"):
            return str(Path(unquote(urlparse(value).path)).expanduser().resolve())
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(value.removeprefix("sqlite:///")).expanduser().resolve())
        if not value or "://" in value or value.startswith("databricks"):
            return value
        return str(Path(value).expanduser().resolve())


class SimulationConfig(_Section):
    """Only for `fedsynth simulate`: how the slice set is split into hospitals."""

    hospitals: int = Field(3, ge=1, le=64, description="simulated hospitals")
    partition: str = Field(
        "iid",
        description="iid, dirichlet:ALPHA (non-IID by class; dirichlet:ALPHA,min=N moves whole patients "
        "until every hospital has N training slices) or by-site",
    )
    hospitals_dir: str = Field("", description="folder of per-hospital slice sets (written by simulate)")
    client_cpus: int = Field(
        0,
        ge=0,
        description="CPU cores (and torch threads) per simulated hospital (0: chosen with "
        "parallel-hospitals so that every core trains all round: the cores split among fewer hospitals)",
    )
    parallel_hospitals: int = Field(
        0,
        ge=0,
        description="hospitals training at once (0: chosen so no core idles: one wave per core count "
        "when the hospitals divide evenly, else all at once sharing the cores, up to 4 per core)",
    )
    client_gpus: float = Field(0.0, ge=0, description="GPU share per simulated hospital")
    ray_address: str = Field(
        "",
        description="HOST:PORT of a running Ray cluster (what `ray start --head` prints) to run the "
        "simulated hospitals on, across its machines; every node needs this fedsynth installed and the run "
        "directory at the same path (a shared filesystem). client-cpus is then each hospital's cores "
        "(default 1) and the cluster's cores decide how many train at once. Empty: a Ray instance on this "
        "machine, started and stopped with the run (never a cluster from RAY_ADDRESS or `ray start`)",
    )
    validation: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of the training patients kept out of training to score every round's generator "
        "(fedsynth sample --round best), when the slice set has no validation split of its own (0: none)",
    )

    slow: str = Field(
        "",
        description="rehearse slow sites: NAME=SECONDS[,NAME=SECONDS...]; each named simulated hospital "
        "waits that long before every round's training, so a shorter federation.round-timeout leaves it out "
        "of the round (recorded among its failures, naming the timeout) (empty: none)",
    )
    join: str = Field(
        "",
        description="rehearse hospitals that join late: NAME=ROUND[,NAME=ROUND...]; each named simulated "
        "hospital declines every round before that one, saying it has not joined, as a site not yet "
        "connected takes no part (empty: none)",
    )

    @field_validator("slow", "join")
    @classmethod
    def _check_rehearsal(cls, value: str, info: ValidationInfo) -> str:
        slow = info.field_name == "slow"
        number, wanted = (r"\d+(\.\d+)?", "SECONDS") if slow else (r"[1-9]\d*", "ROUND (1 or more)")
        for item in filter(None, value.split(",")):
            name, _, amount = item.partition("=")
            if not name.strip() or not re.fullmatch(number, amount):
                raise ValueError(f"expected NAME={wanted}, e.g. hospital-c={30 if slow else 3}")
        return value

    def rehearsed(self) -> dict[str, dict[str, str]]:
        """``slow`` and ``join`` as {key: {hospital: value}}."""
        return {
            key: dict(item.partition("=")[::2] for item in filter(None, spec.split(",")))
            for key, spec in (("slow", self.slow), ("join", self.join))
        }

    def rehearsal(self, hospital: str) -> tuple[float, int]:
        """A simulated hospital's rehearsed delay in seconds (``slow``) and the first round
        it takes part in (``join``; 1: from the start)."""
        rehearsed = self.rehearsed()
        return float(rehearsed["slow"].get(hospital, 0)), int(rehearsed["join"].get(hospital, 1))

    @field_validator("ray_address")
    @classmethod
    def _check_ray_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if value and (not sep or not host or "/" in value or not port.isdigit()):
            raise ValueError("must be HOST:PORT of a running Ray cluster's head, e.g. 10.0.0.5:6379")
        return value

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str) -> str:
        try:
            parse_spec(value)
        except PartitionError:
            raise ValueError(f"must be {SPEC_HELP}") from None
        return value


class RunConfig(_Section):
    """Everything a federated run needs, with defaults that fit a 2-core CPU."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)

    @model_validator(mode="before")
    @classmethod
    def _expand_presets(cls, raw: Any) -> Any:
        """``model.name: PRESET`` (e.g. medscangan, the MedScanGAN recipe on the wgan-gp family)
        expands to the preset's keys; keys the user gives explicitly win over the preset's."""
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model")
        if not isinstance(model, dict) or model.get("name") not in presets():
            return raw
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
        preset = presets()[raw["model"].pop("name")].settings
        for dotted, value in preset.items():
            section, key = dotted.split(".")
            node = raw.setdefault(section, {})
            if not isinstance(node, dict):
                continue  # reported by validation
            if key not in node and key.replace("-", "_") not in node:
                node[key] = value
        return raw

    @model_validator(mode="after")
    def _link_sections(self) -> RunConfig:
        self.train._family = self.model.name  # `train.loss: auto` depends on the family
        family = self.model.family
        if family.federation == EMBEDDING and self.federation.rounds != 1:
            # a family that federates a summary releases it once: one round, whatever the default
            if "rounds" in self.federation.model_fields_set:
                raise ValueError(
                    f"federation.rounds: {family.name} federates in one round (each hospital releases its "
                    "summary once); set federation.rounds=1 or leave it out"
                )
            self.federation.rounds = 1
        if self.federation.secure_aggregation == "on":
            if family.federation == EMBEDDING:
                raise ValueError(
                    f"federation.secure-aggregation: not with {family.name} (its hospitals release a noised "
                    "summary once, not model updates)"
                )
            if self.federation.client_dp_noise_multiplier > 0:
                raise ValueError(
                    "federation.secure-aggregation: not with federation.client-dp-noise-multiplier (the "
                    "server clips each hospital's update before noising the average, and under secure "
                    "aggregation it never sees one)"
                )
        family.check_config(self)
        return self

    # --- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Validate a nested dict (kebab-case keys). Raises ConfigError naming every bad key."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_describe(err, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Load a YAML file, apply dotted-key overrides, validate.

        Raises
        ------
        ConfigError
            The file is missing or not YAML, or a key is unknown or ill-typed.
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for key, value in (overrides or {}).items():
            _set_dotted(raw, key, value)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any], *, source: str = "options") -> RunConfig:
        """Defaults plus dotted-key overrides such as ``{"train.local-steps": 10}``."""
        raw: dict[str, Any] = {}
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunConfig:
        """Build from Flower's flat run config (``"train.local-steps": 50``).

        Keys Flower passes but fedsynth does not know are errors, as elsewhere. Flower
        passes every key (the app's defaults filled in), so with a preset name in
        ``model.name`` the keys still at their default value are left to the preset.
        """
        flat = dict(run_config)
        preset = presets().get(str(flat.get("model.name")))
        if preset is not None:
            defaults = RunConfig().to_run_config()
            flat = {
                k: v
                for k, v in flat.items()
                if k == "model.name" or k not in preset.settings or v != defaults.get(k)
            }
        return cls.from_overrides(flat, source="run config")

    # --- export ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with kebab-case keys, as written to ``config.yaml``."""
        return self.model_dump(by_alias=True, mode="json")

    def to_run_config(self) -> dict[str, Any]:
        """Flat dotted keys, the shape of Flower's run config."""
        return _flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides applied and validated."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return RunConfig.from_dict(raw, source="options")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; VALUE is read as YAML (``10`` is an int, ``true`` a bool).

    Raises
    ------
    ConfigError
        An item has no ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.local-steps=100")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        alias = field.alias or name
        dotted = f"{prefix}.{alias}" if prefix else alias
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, dotted))
        else:
            keys.append(dotted)
    return keys


def _describe(err: ValidationError, source: str) -> str:
    known = _known_keys(RunConfig)
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        if not key:  # a rule across keys (model validator): its message names them
            lines.append(str(item["msg"]).removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(key, known, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            lines.append(f"{key}: unknown key{suffix}")
        else:
            lines.append(
                f"{key}: {str(item['msg']).removeprefix('Value error, ')} (got {item.get('input')!r})"
            )
    noun = "problem" if len(lines) == 1 else "problems"
    return f"{source}: {len(lines)} {noun}: " + "; ".join(lines)
