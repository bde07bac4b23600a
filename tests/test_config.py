"""Recipe loading: precedence, strict keys and types, actionable messages."""
import json

import pytest
import yaml

from dsclip.config import ConfigError, RunConfig, apply_override, load_config, to_dict


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_recipe_then_overrides_in_that_order(tmp_path):
    recipe = write_recipe(tmp_path, {"optim": {"lr": 1e-4, "warmup_steps": 10}, "data": {"batch_size": 32}})
    cfg = load_config(recipe, ["optim.lr=5e-5", "train.max_steps=100"])
    assert cfg.optim.lr == 5e-5  # override beats recipe
    assert cfg.optim.warmup_steps == 10  # recipe beats default
    assert cfg.data.batch_size == 32
    assert cfg.train.max_steps == 100
    assert cfg.optim.weight_decay == RunConfig().optim.weight_decay  # untouched default


def test_unknown_key_names_path_and_closest_key(tmp_path):
    recipe = write_recipe(tmp_path, {"optim": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'.*"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"unknown key 'optim.weight_decy'; did you mean 'optim.weight_decay'\?"):
        load_config(None, ["optim.weight_decy=0.1"])


def test_unknown_section_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'\?"):
        load_config(write_recipe(tmp_path, {"modle": {"name": "ViT-B-32"}}))


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int, got 'many' \(str\)"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match=r"train.export: expected bool"):
        load_config(None, ["train.export=3"])
    with pytest.raises(ConfigError, match=r"optim.betas: expected a list"):
        load_config(None, ["optim.betas=0.9"])


def test_literal_choice_error_suggests_valid_value():
    with pytest.raises(ConfigError, match=r"optim.schedule: 'cosin' is not one of .*did you mean 'cosine'\?"):
        load_config(None, ["optim.schedule=cosin"])


def test_float_fields_accept_yaml_scientific_strings_and_ints():
    cfg = load_config(None, ["optim.lr=1e-4", "optim.weight_decay=0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.weight_decay, float)


def test_impossible_combinations_fail_before_training():
    with pytest.raises(ConfigError, match=r"warmup_steps=100 is not below train.max_steps=50"):
        load_config(None, ["train.max_steps=50", "optim.warmup_steps=100"])
    with pytest.raises(ConfigError, match=r"grad_checkpointing and model.activation_offload"):
        load_config(None, ["model.grad_checkpointing=true", "model.activation_offload=true"])
    with pytest.raises(ConfigError, match=r"data.webdataset.urls is empty"):
        load_config(None, ["data.kind=webdataset"])


def test_unknown_model_name_suggests_architectures():
    with pytest.raises(ConfigError, match=r"model.name 'ViT-B-23' is not an open_clip architecture; did you mean"):
        load_config(None, ["model.name=ViT-B-23"])


def test_missing_recipe_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"must look like key.path=value"):
        apply_override({}, "optim.lr")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "freeze.strategy=lit"])
    again = load_config(write_recipe(tmp_path, to_dict(cfg)))
    assert again == cfg


@pytest.mark.parametrize("recipe", [None, "launch/recipes/production.yaml", "launch/recipes/quick.yaml"])
def test_the_short_run_that_multinode_docs_suggest_is_a_valid_recipe(recipe):
    import re
    import shlex

    from dsclip_testutils import REPO
    text = (REPO / "docs" / "multinode.md").read_text()
    suggested = re.search(r"A short run first: `(.*?)`", text, flags=re.S).group(1)
    overrides = [arg for arg in shlex.split(suggested) if arg != "--set"]
    assert "train.max_steps=20" in overrides
    load_config(str(REPO / recipe) if recipe else None, overrides)  # raises on an invalid combination


def test_readme_recipe_reference_is_current():
    from dsclip.config import recipe_reference
    from dsclip_testutils import REPO
    assert recipe_reference() in (REPO / "docs" / "recipes.md").read_text(), "regenerate with: python -m dsclip.config"


def test_override_value_that_is_not_yaml_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"override 'data.webdataset.urls=\[/d/\{0..9\}.tar\]': the value is not valid YAML"):
        load_config(None, ["data.webdataset.urls=[/d/{0..9}.tar]"])
    cfg = load_config(None, ['data.webdataset.urls=["/d/{0..9}.tar"]', "data.kind=webdataset"])
    assert cfg.data.webdataset.urls == ["/d/{0..9}.tar"]


def test_siglip_loss_needs_a_model_with_a_logit_bias():
    with pytest.raises(ConfigError, match=r"loss.kind=siglip needs a logit bias, which dsclip-tiny has not"):
        load_config(None, ["loss.kind=siglip"])
    cfg = load_config(None, ["loss.kind=siglip", "model.init_logit_bias=-10", "model.init_logit_scale=2.303"])
    assert cfg.model.has_logit_bias()


@pytest.mark.parametrize("url, kept, secret", [
    ("https://bob:hunter2@host/a/{000..009}.tar", "https://", "hunter2"),
    ("https://bucket.s3.amazonaws.com/x.tar?X-Amz-Signature=abc123&X-Amz-Credential=AKIA", "x.tar?", "abc123"),
    ("pipe:curl -s -H 'Authorization: Bearer sk-live-42' https://h/x.tar", "https://h/x.tar", "sk-live-42"),
    ("pipe:curl -u bob:hunter2 https://h/x.tar", "pipe:curl", "hunter2"),
    ("pipe:AWS_SECRET_ACCESS_KEY=abc123 aws s3 cp s3://b/x.tar -", "aws s3 cp", "abc123"),
    ("https://ghp_abc123@github.com/org/data/x.tar", "github.com/org", "ghp_abc123"),
    ("pipe:wget --header='Authorization: Bearer abc123' -O - http://h/x.tar", "-O - http://h/x.tar", "abc123"),
    ("pipe:curl -ubob:abc123 http://h/x.tar", "http://h/x.tar", "abc123"),
    ("pipe:fetch --token abc123 x.tar", "x.tar", "abc123"),
    ("pipe:fetch api_key=abc123 x.tar", "x.tar", "abc123"),
])
def test_credentials_in_data_urls_are_redacted_wherever_the_config_is_written(url, kept, secret):
    from dsclip.config import recorded
    cfg = load_config(None, ["data.kind=webdataset", f"data.webdataset.urls=[{json.dumps(url)}]"])
    written = recorded(cfg)["data"]["webdataset"]["urls"][0]
    assert secret not in written and kept in written and "<redacted>" in written


@pytest.mark.parametrize("text", ["/data/shard-{000000..000099}.tar", "pipe:python -u fetch.py shard-{0..9}",
                                  "pipe:aws s3 cp s3://bucket/shard-0.tar -"])
def test_what_holds_no_credential_is_written_as_it_is(text):
    from dsclip.credentials import redact
    assert redact(text) == text
