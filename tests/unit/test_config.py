"""Config composition through real Hydra: presets load, bad keys and values fail before any work."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from engram_train.config import Config, ConfigError, to_config

CONF = str(Path(__file__).resolve().parents[2] / "engram_train" / "conf")


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_default_preset_composes_and_validates():
    cfg = compose_config()
    assert cfg.engram.enabled and cfg.engram.layers == [1] and cfg.engram.ngram_orders == [2, 3]
    assert cfg.engram.heads_per_order == 8 and cfg.engram.lr_multiplier == 5.0 and cfg.engram.gate_signed_sqrt
    assert cfg.experiment.wandb.mode == "offline"
    assert cfg.experiment.run_dir == "outputs/tiny"


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
