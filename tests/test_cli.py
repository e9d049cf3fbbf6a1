"""The command line as a new user meets it: every command the README shows parses, bad
input is one line before anything heavy loads, and --set means what it says."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from lit_modules.config import load_run_config, safe_load
from lit_modules.config_errors import ConfigError
from studies.cli import build_parser, main, one_line
from studies.spec import load_spec

from .conftest import REPO, SPECS

# ---------------------------------------------------------------- the README, verbatim
PLACEHOLDER = re.compile(r"\[|\.\.\.|…|\b(SPEC|CONFIG|NAME|URL|URI|N|PATH)\b")


def readme_commands() -> list[list[str]]:
    """Every ``masklab`` command line the README shows: in its shell blocks
    (continuations joined, comments dropped) and in inline code, except the syntax
    templates of the command table (``masklab run SPEC [--set k=v ...]``); as argv lists
    after the program name."""
    text = (REPO / "README.md").read_text()
    lines = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):  # fences paired in order
        if lang in ("", "bash", "sh"):
            lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(span.split()) for span in re.findall(r"`(masklab [^`]+)`", prose)
              if not PLACEHOLDER.search(span)]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:1] == ["masklab"] and len(words) > 1 and not words[1].startswith("error:"):
            commands.append(words[1:])
    return commands


def _subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_readme_shows_masklab_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    """Each line parses against the CLI with the options it shows (argparse exits on an
    unknown option or a missing argument). Prose that names a command (`masklab train`)
    names one that exists."""
    if len(argv) == 1:
        assert argv[0] in _subcommands()
        return
    args = build_parser().parse_args(argv)
    assert callable(args.func)
    spec = getattr(args, "spec", None)
    for name in [spec] if isinstance(spec, str) else (spec or []):
        if not name.startswith("$"):
            assert (SPECS / f"{name}.yaml").exists() or (REPO / name).exists(), f"README names no such spec: {name}"
    config = getattr(args, "config", None)
    if config:
        assert (REPO / config).exists(), config


def test_readme_activates_the_environment_before_its_commands():
    """The commands live in .venv/bin: the README says to activate it before it shows
    any of them."""
    text = (REPO / "README.md").read_text()
    activate = text.find("source .venv/bin/activate")
    blocks = [m.start() for m in re.finditer(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
              if re.search(r"^(masklab|mlflow|optuna-dashboard) ", m.group(1), flags=re.M)]
    first = min(blocks)
    assert 0 <= activate < first


# ---------------------------------------------------------------- bad input is fast
def _fresh_python(argv: list[str], cwd) -> subprocess.CompletedProcess:
    code = ("import sys; from studies.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', [m for m in ('torch', 'lightning', 'mlflow', 'optuna') if m in sys.modules]); "
            "sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv,field", [
    (["run", "gpt_pbw_demo", "--set", "masking.p_bw=1.5"], "--set masking.p_bw"),
    (["run", "gpt_pbw_demo", "--set", "trainer.max_steps=0"], "trainer.max_steps"),
    (["run", "gpt_pbw_demo", "--set", "model.dept=3"], "model.dept"),
    (["worker", "gpt_search", "--set", "optim.lr=0.1"], "--set optim.lr"),
    (["launch", "gpt_pbw_demo", "--workers", "2", "--set", "masking.p_bw=-1"], "--set masking.p_bw"),
    (["train", "studies/specs/gpt_tiny.yaml", "--set", "masking.p_bw=1.5"], "masking.p_bw"),
    (["train", "studies/specs/bert_tiny.yaml", "--set", "masking.mask_ratio=2"], "masking.mask_ratio"),
])
def test_bad_input_is_one_line_before_torch_or_lightning(argv, field, tmp_path):
    out = _fresh_python([*argv, "--output-dir", str(tmp_path / "out")], REPO)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("masklab: error:") and field in lines[0], out.stderr
    assert "HEAVY []" in out.stdout, out.stdout  # torch, Lightning, MLflow and Optuna never loaded
    assert not (tmp_path / "out" / "optuna.db").exists()  # nothing was created


# ---------------------------------------------------------------- --set means what it says
def test_set_of_a_grid_key_names_the_key_and_the_grid():
    with pytest.raises(ConfigError) as info:
        load_spec(SPECS / "gpt_pbw_demo.yaml", ["masking.p_bw=1.5"])
    msg = str(info.value)
    assert "--set masking.p_bw = 1.5" in msg and "grid: masking.p_bw: [0.0, 0.05, 0.1]" in msg


def test_set_of_a_search_key_or_of_the_replicate_seed_is_refused():
    with pytest.raises(ConfigError, match=r"--set optim.lr = 0.01: the spec's search: optim.lr"):
        load_spec(SPECS / "gpt_search.yaml", ["optim.lr=0.01"])
    with pytest.raises(ConfigError, match=r"--set seed = 5: the spec's replicates: 2"):
        load_spec(SPECS / "gpt_pbw_demo.yaml", ["seed=5"])
    with pytest.raises(ConfigError, match=r"--set masking = .*grid: masking.p_bw"):
        load_spec(SPECS / "gpt_pbw_demo.yaml", ["masking={name: causal-lm, p_bw: 0.5}"])


def test_set_of_an_unswept_key_applies_to_every_trial():
    spec = load_spec(SPECS / "gpt_pbw_demo.yaml", ["trainer.max_steps=20", "optim.lr=1e-3"])
    assert spec.fixed["trainer"]["max_steps"] == 20 and spec.fixed["optim"]["lr"] == 0.001
    for point, seed in spec.grid_points():
        assert spec.run_config_dict(point, seed)["optim"]["lr"] == 0.001


# ---------------------------------------------------------------- numbers as researchers write them
@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("-2E+4", -2e4), ("3e5", 3e5), ("1.5e-3", 1.5e-3),
                                        ("0.1", 0.1), ("3", 3), ('"1e-3"', "1e-3"), ("abc", "abc")])
def test_yaml_reads_exponent_floats_as_numbers(text, value):
    got = safe_load(text)
    assert got == value and type(got) is type(value)


def test_exponent_floats_in_set_and_in_spec_files(tmp_path):
    cfg = load_run_config(SPECS / "gpt_tiny.yaml", ["optim.lr=1e-3", "optim.weight_decay=5e-2"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05
    text = (SPECS / "gpt_search.yaml").read_text()
    path = tmp_path / "search.yaml"
    path.write_text(re.sub(r"low: [0-9.e-]+", "low: 1e-4", text, count=1))
    spec = load_spec(path)
    assert spec.search[0].low == 1e-4


def test_yaml_stays_safe():
    with pytest.raises(Exception, match="could not determine a constructor"):
        safe_load("x: !!python/object/apply:os.system ['true']")


# ---------------------------------------------------------------- masklab list
def test_list_gives_one_clean_line_per_entry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    entries = [ln for ln in out.splitlines() if ln.startswith("  ")]
    assert len(entries) >= 30
    for line in entries:
        name, _, text = line.strip().partition(" ")
        text = text.strip()
        assert text and "``" not in text and text[-1] in ".%)" or text.startswith(("study:", "run config:")), line


def test_one_line_takes_the_first_sentence():
    assert one_line("Forward ``p_bw`` LM, with\n    a coin. More text.\n\nNext para.") == "Forward p_bw LM, with a coin."


# ---------------------------------------------------------------- baseline levels
def test_baseline_is_a_grid_value_of_a_swept_factor():
    import yaml

    d = yaml.safe_load((SPECS / "gpt_pbw_demo.yaml").read_text())
    assert load_spec({**d, "baseline": {"masking.p_bw": 0}}).baseline == {"masking.p_bw": 0}
    with pytest.raises(ConfigError, match=r"baseline.masking.p_bw = 0.2: must be one of the grid values"):
        load_spec({**d, "baseline": {"masking.p_bw": 0.2}})
    with pytest.raises(ConfigError, match=r"baseline.model.width = 64: is not swept"):
        load_spec({**d, "baseline": {"model.width": 64}})
