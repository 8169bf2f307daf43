"""Config composition through real Hydra: presets load, bad keys and values fail before any work."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from omegaconf import OmegaConf

from engram_train.config import GROUPS, Config, ConfigError, to_config

CONF = str(Path(__file__).resolve().parents[2] / "engram_train" / "conf")


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_default_preset_composes_and_validates(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config()
    assert cfg.engram.enabled and cfg.engram.layers == [1] and cfg.engram.ngram_orders == [2, 3]
    assert cfg.engram.heads_per_order == 8 and cfg.engram.lr_multiplier == 5.0 and cfg.engram.gate_signed_sqrt
    assert cfg.experiment.wandb.effective_mode() == "offline"
    assert cfg.experiment.run_dir == "outputs/tiny"


def test_wandb_mode_follows_wandbs_own_environment_variable_unless_set(monkeypatch):
    """WANDB_MODE is how W&B users switch modes; wandb.init(mode=...) ignores it, so the default reads it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config().experiment.wandb.effective_mode() == "disabled"
    assert compose_config("experiment.wandb.mode=online").experiment.wandb.effective_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="experiment.wandb.mode"):
        compose_config()


def test_engram_off_is_the_moe_baseline():
    cfg = compose_config("engram=off")
    assert not cfg.engram.enabled and cfg.model.num_experts == 8


def test_unknown_key_is_rejected_while_composing():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("engram.heads_per_ordr=4")
    assert "engram.heads_per_ordr" in str(error.value)
    assert "heads_per_ordr" in str(error.value.__cause__)


def test_wrong_type_is_rejected_with_the_key():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("model.hidden_size=wide")
    assert "model.hidden_size=wide" in str(error.value)
    assert "could not be converted to Integer" in str(error.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("engram.layers=[7]", "engram.layers"),
        ("engram.heads_per_order=0", "engram.heads_per_order"),
        ("engram.ngram_orders=[1,2]", "engram.ngram_orders"),
        ("engram.optimizer=sgd", "engram.optimizer"),
        ("engram.table_dtype=float16", "engram.table_dtype"),
        ("model.moe_router_topk=9", "model.moe_router_topk"),
        ("model.hidden_size=130", "model.hidden_size"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.schedule=linear", "optim.schedule"),
        ("data.on_bad_shard=ignore", "data.on_bad_shard"),
        ("parallel.grad_sync=ddp", "parallel.grad_sync"),
        ("experiment.wandb.mode=cloud", "experiment.wandb.mode"),
    ],
)
def test_bad_value_names_the_key_and_the_allowed_range(override, key):
    with pytest.raises(ConfigError) as error:
        compose_config(override)
    message = str(error.value)
    assert message.startswith(key + "=")
    assert "must" in message or "choose one of" in message


def group_options() -> list[tuple[str, Path]]:
    """Every option of a schema group (conf/<group>/<option>.yaml). ``# @package _global_`` presets (the
    sweep_* experiments) are left out: they set keys of several groups and pin the exact settings that
    committed sweep results were produced with, defaults included."""
    options = []
    for group in GROUPS:
        for path in sorted((Path(CONF) / group).glob("*.yaml")):
            if "@package _global_" not in path.read_text().splitlines()[0]:
                options.append((group, path))
    return options


def option_values(path: Path) -> dict:
    """What an option file sets on top of its group's schema."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert values.pop("defaults", None) == ["schema"], f"{path}: start with `defaults: [schema]`"
    return values


def repeated_defaults(values: dict, defaults: dict, prefix: str) -> list[str]:
    repeated = []
    for key, value in values.items():
        if isinstance(value, dict):
            repeated += repeated_defaults(value, defaults[key], f"{prefix}.{key}")
        elif value == defaults[key]:
            repeated.append(f"{prefix}.{key}={value!r}")
    return repeated


@pytest.mark.parametrize("group, path", group_options(), ids=lambda x: getattr(x, "stem", x))
def test_group_option_sets_only_what_differs_from_the_schema(group, path):
    """The schema (engram_train/config.py) is the one place a default is written; an option repeating one
    would let the two drift apart."""
    defaults = OmegaConf.to_container(OmegaConf.structured(GROUPS[group]))
    repeated = repeated_defaults(option_values(path), defaults, group)
    assert not repeated, f"{path.name} repeats the schema's defaults {repeated}; delete those lines"


def schema_plus(options: dict[str, str]) -> Config:
    """The schema's defaults with each chosen option's values merged on top."""
    merged = OmegaConf.merge(
        OmegaConf.structured(Config),
        {group: option_values(Path(CONF) / group / f"{option}.yaml") for group, option in options.items()},
    )
    return OmegaConf.to_object(merged)


def default_options() -> dict[str, str]:
    """The option config.yaml's defaults list picks for each schema group."""
    entries = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "config.yaml"))["defaults"]
    chosen = {key: value for entry in entries if isinstance(entry, dict) for key, value in entry.items()}
    assert chosen.keys() >= {"model", "engram", "parallel", "data", "optim", "experiment"}, chosen
    return {key: value for key, value in chosen.items() if key in GROUPS}


def test_default_composition_is_the_schema_plus_the_default_options():
    assert compose_config() == schema_plus(default_options())


@pytest.mark.parametrize("group, path", group_options(), ids=lambda x: getattr(x, "stem", x))
def test_each_option_composes_to_the_schema_plus_its_values(group, path):
    assert compose_config(f"{group}={path.stem}") == schema_plus({**default_options(), group: path.stem})
