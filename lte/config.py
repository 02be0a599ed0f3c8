"""The run spec: one pydantic model that the simulator, the peers and the coordinator all read.

Validation happens here, once, so every tool rejects bad input with the same one-line message.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lte.errors import ConfigError


class _Strict(BaseModel):
    # Unknown keys are almost always typos; a silently ignored `merge_evry` would ruin a run. YAML's .inf and .nan
    # pass `gt=0` checks but no run survives them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(_Strict):
    name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    dataset: Literal["digits", "imagefolder", "cifar10"] = "digits"
    path: str | None = None
    batch_size: int = Field(64, gt=0)
    image_size: int | None = Field(None, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)


class LTESpec(_Strict):
    heads: int = Field(4, gt=0)
    rank: int = Field(32, gt=0)
    alpha: float = Field(256.0, gt=0)
    merge_every: int = Field(10, gt=0)
    reset: bool = False
    fold: bool = True
    # Modules (fnmatch patterns on module names) kept dense and averaged like replicas, e.g. a classifier
    # whose output size is smaller than the rank.
    dense_modules: list[str] = Field(default_factory=lambda: ["head"])
    a_init: Literal["sqrt_in_over_r", "sqrt_r_over_in", "unit"] = "sqrt_in_over_r"
    # Pipelined rounds (design notes §5): steps a head trains between its snapshot and the application of the merge
    # of that snapshot; 0 is synchronous LTE. On the network it is the steps a peer trains while its round is in
    # flight; the simulator uses it to measure what that costs.
    merge_delay: int = Field(0, ge=0)
    # The samples a full round brings (0: none). Merge weights are n_n / max(sum n, round_samples), so a round with
    # fewer members than usual moves the base by that fraction of its update instead of applying its few heads'
    # whole update (design notes §5; docs/benchmarks.md "Rounds with few members").
    round_samples: int = Field(0, ge=0)
    # The outer step on each round's merged update (design notes §6): m <- outer_momentum m + U, and the base moves by
    # outer_lr (U + outer_momentum m) (Nesterov, as DiLoCo's outer step). 1 and 0 are plain LTE, bit for bit.
    outer_lr: float = Field(1.0, gt=0)
    outer_momentum: float = Field(0.0, ge=0, lt=1)
    # How LoRA factors travel (lte/quant.py): raw fp32, fp16, or blockwise int8. Every merge uses the decoded values
    # and V becomes them, so the code's error stays in the head and goes out in its next contribution. The network
    # takes it from here (the coordinator's --wire may override it for network-only experiments).
    wire: Literal["raw", "fp16", "int8"] = "raw"

    @model_validator(mode="after")
    def _one_merge_in_flight(self) -> "LTESpec":
        # A snapshot must be taken against the base the previous merge produced (one base version per round).
        if self.merge_delay > self.merge_every:
            raise ValueError(f"merge_delay={self.merge_delay} is larger than merge_every={self.merge_every}: at most "
                             "one merge can be in flight, so its snapshot must come at most merge_every steps earlier")
        if self.merge_delay and self.reset:
            raise ValueError("merge_delay > 0 needs the reset-less rule (reset: false): a reset would erase the "
                             "progress made while the merge is in flight")
        if self.wire != "raw" and self.reset:
            raise ValueError(f"wire: {self.wire} needs the reset-less rule (reset: false): a reset would erase the "
                             "coding error that the next round sends again")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class OptimSpec(_Strict):
    lr: float = Field(3e-4, gt=0)
    replica_lr: float | None = Field(None, gt=0)
    full_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    warmup_steps: int = Field(50, ge=0)
    steps: int = Field(1500, gt=0)
    # The DiLoCo baseline's outer optimizer (Nesterov SGD on the averaged deltas), the DiLoCo paper's values.
    outer_lr: float = Field(0.7, gt=0)
    outer_momentum: float = Field(0.9, ge=0, lt=1)


class RunSpec(_Strict):
    run: str = Field("digits-vit-tiny", min_length=1)  # names the run's DHT keys
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and scikit-learn take no other seed
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    lte: LTESpec = Field(default_factory=LTESpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    eval_every: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _batch_splits_across_heads(self) -> "RunSpec":
        if self.data.batch_size % self.lte.heads:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by lte.heads={self.lte.heads}: "
                "the cumulative batch is split evenly across heads"
            )
        return self

    def spec_hash(self) -> str:
        """A stable hash of everything that must agree between participants of one run.

        Fields added after runs were published are left out while they hold their default, so a spec that does not
        use them hashes as before and existing checkpoints and running coordinators stay valid.
        """
        data = self.model_dump(mode="json")
        for (section, name), default in _HASHED_ONLY_IF_SET.items():
            if data[section][name] == default:
                del data[section][name]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# (section, field) -> the default value at which `RunSpec.spec_hash` leaves the field out.
_HASHED_ONLY_IF_SET: dict[tuple[str, str], Any] = {("lte", "merge_delay"): 0, ("lte", "round_samples"): 0,
                                                   ("lte", "outer_lr"): 1.0, ("lte", "outer_momentum"): 0.0,
                                                   ("lte", "wire"): "raw"}


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=3` strings (YAML values) into a nested dict, so any spec field can be set from the command line."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not of the form key.path=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def spec_from_dict(data: dict[str, Any], source: str = "config") -> RunSpec:
    try:
        return RunSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err)}") from None


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> RunSpec:
    """Read a YAML run spec; every failure is a ConfigError with one line that names the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:  # the defaults alone describe no usable run (a 224x224 model for 8x8 digits)
        raise ConfigError(f"{path} is empty: a run spec needs at least model, data and lte (see configs/digits.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return spec_from_dict(_deep_update(data, overrides or {}), str(path))
