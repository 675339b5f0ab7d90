"""The config (schemas/config.py): the reference's defaults, plain GRPO in one line, errors
that name the field and the fix, stage hashes, presets, plugins."""

from __future__ import annotations

import pytest

from schemas.config import DEFAULT_CONFIG, ConfigError, HerlConfig, load_config, stage_config_hash


def test_reference_defaults():
    c = HerlConfig()
    assert (c.task.prompts_per_iteration, c.rollout.n, c.rollout.temperature) == (64, 8, 1.0)
    assert (c.hindsight.threshold, c.hindsight.candidate_limit, c.hindsight.temperature) == (1.0, 16, 0.3)
    assert (c.advantages.alpha, c.advantages.replace_top_n, c.advantages.duplicate_best_fallback) == (0.05, 1, True)
    assert (c.train.clip_eps_low, c.train.dual_clip_c, c.train.gamma, c.train.kl_coef) == (0.2, 3.0, 1.0, 0.0)
    assert c.hindsight.train_prompt == "hindsight" and c.algorithm == "herl"
    # every field is documented
    for section in [c, c.model, c.task, c.rollout, c.grade, c.hindsight, c.advantages, c.train]:
        for name, field in type(section).model_fields.items():
            assert field.description, f"{type(section).__name__}.{name} has no docstring"


def test_plain_grpo_is_one_line():
    c = load_config(None, {"algorithm": "grpo"})
    assert not c.hindsight_enabled and not c.bonus_enabled
    assert load_config(None).hindsight_enabled


@pytest.mark.parametrize("override,message", [
    ({"rollout.n": 1}, "rollout.n must be >= 2"),
    ({"advantages.replace_top_n": 9}, "replace_top_n must be in [1, rollout.n=8]"),
    ({"hindsight.threshold": 1.5}, "threshold must be in (0, 1]"),
    ({"train.dual_clip_c": 1.0}, "dual_clip_c must be > 1"),
    ({"train.lerning_rate": 1.0}, "train.lerning_rate"),
    ({"algorithm": "ppo"}, "field algorithm"),
])
def test_bad_config_names_field_and_fix(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, override)
    assert message in str(exc.value) and str(DEFAULT_CONFIG) in str(exc.value)


def test_bad_toml_names_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("iterations = [")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(p)


def test_stage_hash_depends_only_on_its_sections():
    a, b = load_config(None), load_config(None, {"train.learning_rate": 1e-4, "iterations": 99})
    assert stage_config_hash(a, "rollout") == stage_config_hash(b, "rollout")
    assert stage_config_hash(a, "train") != stage_config_hash(b, "train")


def test_flow_parameters_merge_over_overrides():
    from flows import flow_overrides

    assert flow_overrides(None, None, None, None, {"iterations": 16})["iterations"] == 16
    assert flow_overrides("r", 3, "m", None, {"iterations": 16, "seed": 2}) == {
        "iterations": 3, "seed": 2, "run_id": "r", "model.path": "m"}


@pytest.mark.parametrize("preset", ["medical", "instruction_following", "tiny"])
def test_shipped_presets_are_valid(preset):
    from schemas.config import PRESETS

    cfg = load_config(PRESETS / f"{preset}.toml")
    if preset == "medical":  # the reference's medical script
        assert (cfg.train.gamma, cfg.train.kl_coef, cfg.train.mini_batches, cfg.rollout.max_tokens) == (0.1, 0.001, 4, 4096)
        assert (cfg.grade.judge.model, cfg.grade.judge.temperature, cfg.grade.judge.max_tokens) == ("gpt-4o-mini", 0.1, 4096)
        # pitfalls weigh 0, its constraint wording as raw text, revisions sampled at the
        # rollout temperature (its rollout ignores the 0.3 it configures), one PPO epoch
        assert (cfg.grade.pitfalls, cfg.hindsight.template, cfg.hindsight.chat_template) == ("ignore", "reference", False)
        assert (cfg.hindsight.temperature, cfg.train.ppo_epochs, cfg.train.revision_logprob_temperature) == (
            1.0, 1, "rollout")
    if preset == "instruction_following":
        assert (cfg.train.gamma, cfg.train.kl_coef, cfg.train.mini_batches, cfg.rollout.max_tokens) == (1.0, 0.0, 2, 2048)
    assert cfg.train.weight_decay == 0.01 and cfg.train.hindsight_weight == "ratio"


def test_a_preset_by_name():
    from schemas.config import PRESETS

    assert load_config("smollm2") == load_config(PRESETS / "smollm2.toml")
    assert load_config("smollm2").model.path == "builtin:smollm2-135m-instruct"
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("no_such_preset")


def test_a_changed_plugin_check_redoes_grading(tmp_path, monkeypatch):
    """The grade stage's hash covers the plugin modules' source: editing a check regrades."""
    mod = tmp_path / "herl_test_plugin_mod.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    none = load_config(None)
    cfg = load_config(None, {"plugins": ["herl_test_plugin_mod"]})
    first = {s: stage_config_hash(cfg, s) for s in ("grade", "hindsight", "heldout", "rollout")}
    assert first["grade"] != stage_config_hash(none, "grade")  # adding a plugin counts
    mod.write_text("X = 2  # the check changed\n")
    second = {s: stage_config_hash(cfg, s) for s in first}
    assert all(first[s] != second[s] for s in ("grade", "hindsight", "heldout"))
    assert first["rollout"] == second["rollout"]  # sampling does not depend on checks


