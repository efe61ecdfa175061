"""Job files and option overrides."""

from pathlib import Path

import pytest

from nerbatch.config import ConfigError, TrainConfig, load_config

JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("*.toml"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_job_file_is_valid_and_says_how_to_run_it(job):
    cfg = load_config(job, {})
    assert isinstance(cfg, TrainConfig)
    first_lines = job.read_text().splitlines()[:4]
    assert any("nerbatch" in line and line.lstrip().startswith("#") for line in first_lines)


def test_reference_job_is_the_reference_recipe():
    cfg = load_config(Path(__file__).parents[1] / "jobs" / "conll2003-bert-base-cased.toml", {})
    recipe = ("bert-base-cased", "lhoestq/conll2003", 3, 8, 2e-5)
    assert (cfg.model, cfg.train, cfg.epochs, cfg.batch_size, cfg.lr) == recipe


def test_command_line_overrides_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('model = "m"\nepochs = 2\nlr = 1\n')
    cfg = load_config(job, {"epochs": 5, "batch_size": None})
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr) == ("m", 5, 8, 1.0)


def test_a_job_file_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    job = tmp_path / "job.toml"
    job.write_bytes('output_dir = "runs/M\u00fcnchen"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"job\.toml: .*can't decode byte 0xfc"):
        load_config(job, {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch = 3\n", "unknown key 'epoch'"),
        ('epochs = "3"\n', "epochs = '3' should be int"),
        ("group_by_length = 1\n", "should be bool"),
        ("lr = true\n", "should be float"),
    ],
)
def test_bad_keys_and_types_are_errors(tmp_path, text, message):
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(job, {})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_size": 0}, "batch_size = 0 must be at least 1"),
        ({"gradient_accumulation_steps": 0}, "must be at least 1"),
        ({"warmup_ratio": 1.5}, "between 0 and 1"),
        ({"keep_checkpoints": 0}, "keep_checkpoints = 0 must be at least 1"),
        ({"lr": float("inf")}, "lr = inf must be positive and finite"),
        ({"seed": -1}, "seed = -1 must be between 0 and 2\\*\\*32 - 1"),
        ({"seed": 2**32}, "must be between 0 and"),
        ({"report_to": "bogus"}, "report_to = 'bogus' must be one of .*tensorboard"),
        ({"context": "document", "lone_share": 1.5}, "lone_share = 1.5 must be between 0 and 1"),
        ({"lone_share": 0.5}, "lone_share = 0.5 needs context = document"),
    ],
)
def test_values_that_cannot_work_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)
