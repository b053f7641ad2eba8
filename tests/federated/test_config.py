"""The YAML config loader: round trips, defaults, overrides, a catalog of bad configs, and a fuzz test."""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import yaml
from config_cases import CATALOG, FILES, FIXTURES, MINIMAL, VALID, GiB, MiB, changed
from hypothesis import HealthCheck, given, settings

import fedsup
from fedsup.federated.config import (
    STRATEGIES,
    ConfigProblems,
    RunConfig,
    apply_overrides,
    json_schema,
    load_config,
    resolve_class,
    supervisor_kwargs,
    to_yaml,
)
from fedsup.federated.registry import make_strategy


@pytest.fixture(autouse=True)
def restore_import_state() -> Iterator[None]:
    """File task classes add their directory to sys.path and their module to sys.modules; undo that."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name in ("toy_tasks", "broken_tasks") or name.startswith("tmp_task_"):
            del sys.modules[name]


def write(directory: Path, text: str, name: str = "run.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def problems_of(source: Any, overrides: tuple[str, ...] = ()) -> ConfigProblems:
    with pytest.raises(fedsup.ConfigError) as info:
        load_config(source, overrides)
    assert isinstance(info.value, ConfigProblems)
    return info.value


# -- valid configs


def test_valid_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(VALID)))
    text = to_yaml(config)
    again = load_config(write(tmp_path, text, "resolved.yaml"))
    assert again == config
    assert load_config(yaml.safe_load(text)) == config
    assert load_config(config) == config
    assert "estimate_memory: 512MiB" in text  # sizes stay readable in the resolved YAML


def test_values_are_parsed_and_stored_in_bytes() -> None:
    config = load_config(VALID)
    assert config.task.class_ == "fedsup.examples.synthetic:SyntheticClient"
    assert config.task.estimate_memory == 512 * MiB
    assert config.task.estimate_cuda_memory == GiB
    assert config.supervisor.memory_margin == 256 * MiB
    assert config.supervisor.timeouts.train == 3600
    assert config.faults is not None and config.faults.kinds == ["exception", "exit", "sigkill", "cuda_oom"]


def test_defaults_fill_in() -> None:
    config = load_config(MINIMAL)
    fed, sup = config.federation, config.supervisor
    assert (config.seed, config.output, config.faults) == (0, "runs/tiny", None)
    assert (fed.clients_per_round, fed.min_clients, fed.strategy, fed.evaluate) == (20, 20, "fedavg", True)
    assert config.task.args == {} and config.task.estimate_memory == 0 and config.task.cpus == 1
    assert (sup.devices, sup.max_loaded, sup.max_training, sup.start_method) == ("auto", None, "auto", "forkserver")
    assert (sup.timeouts.load, sup.timeouts.train) == (None, None)
    assert load_config(changed("federation.clients_per_round", 5, base=MINIMAL)).federation.min_clients == 5


def test_default_supervisor_kwargs_match_the_supervisor_defaults() -> None:
    kwargs = supervisor_kwargs(load_config(MINIMAL))
    defaults = {name: p.default for name, p in inspect.signature(fedsup.Supervisor).parameters.items()}
    assert kwargs.pop("load_timeout") is None and kwargs.pop("train_timeout") is None
    for name, value in kwargs.items():
        assert value == defaults[name], name


def test_supervisor_kwargs_build_a_supervisor() -> None:
    data = changed("supervisor.devices", [{"name": "cuda:0", "memory": "16GiB"}, {"name": "cuda:1", "memory": 8 * GiB}])
    kwargs = supervisor_kwargs(load_config(data))
    assert kwargs["devices"] == [{"name": "cuda:0", "memory": 16 * GiB}, {"name": "cuda:1", "memory": 8 * GiB}]
    assert kwargs["max_training"] is None and kwargs["load_timeout"] == 600
    kinds = ("exception", "exit", "sigkill", "cuda_oom")
    assert kwargs["faults"] == fedsup.FaultPlan(0.2, 0, kinds, ("load", "train"), 1)
    supervisor = fedsup.Supervisor(**kwargs)
    assert [g.name for g in supervisor.inventory.gpus] == ["cuda:0", "cuda:1"]
    assert supervisor.policy.max_loaded == 8


def test_relative_task_file_is_resolved_against_the_config_directory(tmp_path: Path) -> None:
    module = f"tmp_task_{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text((FIXTURES / "toy_tasks.py").read_text())
    (tmp_path / "cfg").mkdir()
    data = changed("task", {"class": f"../code/{module}.py:Client", "args": {"size": 3}})
    config = load_config(write(tmp_path / "cfg", yaml.safe_dump(data)))
    assert config.task.class_ == f"{tmp_path / 'code' / module}.py:Client"
    cls = resolve_class(config.task.class_, None)
    assert issubclass(cls, fedsup.Task) and cls.__module__ == module
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert load_config(write(elsewhere, to_yaml(config))) == config


def test_resolve_class_accepts_module_and_file_specs() -> None:
    assert resolve_class("fedsup.examples.synthetic:SyntheticClient", None).__name__ == "SyntheticClient"
    assert resolve_class("toy_tasks.py:Client", FIXTURES).__name__ == "Client"
    with pytest.raises(fedsup.ConfigError, match="not a subclass of fedsup.Task"):
        resolve_class("toy_tasks.py:NotATask", FIXTURES)


def test_custom_strategy_is_imported_and_its_arguments_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    data = changed("federation.strategy", "toy_tasks:Halfway")
    assert load_config(changed("federation.strategy_args", {"weight": 0.2}, base=data)).federation.strategy_args == {
        "weight": 0.2}
    error = problems_of(changed("federation.strategy_args", {"wieght": 0.2}, base=data))
    assert error.problems == ["federation.strategy_args: Halfway(**federation.strategy_args) would fail: got an "
                              "unexpected keyword argument 'wieght' (got {'wieght': 0.2})"]


def test_builtin_strategies_match_fedsup_aggregation() -> None:
    for name, options in STRATEGIES.items():
        strategy = make_strategy(name)
        assert tuple(inspect.signature(type(strategy)).parameters) == options
    assert repr(make_strategy("trimmed_mean", load_config(
        changed("federation.strategy_args", {"beta": 0.2}, base=changed("federation.strategy", "trimmed_mean"))
    ).federation.strategy_args)) == "TrimmedMean(beta=0.2)"


def test_task_file_named_like_another_module_is_refused(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text((FIXTURES / "toy_tasks.py").read_text())
    data = changed("task.class", "json.py:Client")
    error = problems_of(write(tmp_path, yaml.safe_dump(data)))
    assert error.problems[0].startswith(f"task.class: cannot import '{tmp_path / 'json.py'}' as module 'json': "
                                        "another module of that name exists (")
    assert "rename the file" in error.problems[0]


def test_a_run_config_built_in_python_loads_with_overrides() -> None:
    config = RunConfig(name="py", task={"class_": "fedsup.examples.synthetic:SyntheticClient"},  # type: ignore[arg-type]
                       federation={"clients": 4, "rounds": 1})  # type: ignore[arg-type]
    again = load_config(config, ["federation.rounds=2"])
    assert again.federation.rounds == 2 and again.federation.min_clients == 4 and again.output == "runs/py"


def test_check_imports_false_skips_the_import() -> None:
    config = load_config(changed("task.class", "nosuchmodule:Client"), check_imports=False)
    assert config.task.class_ == "nosuchmodule:Client"


def test_json_schema_describes_the_config() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == set(VALID)
    assert schema["required"] == ["name", "task", "federation"]
    assert "class" in schema["$defs"]["TaskConfig"]["properties"]


# -- overrides


def test_overrides_set_values() -> None:
    config = load_config(VALID, [
        "federation.rounds=10",
        "supervisor.devices=cpu",
        "supervisor.timeouts.train=5",
        "task.args.lr=0.1",
    ])
    assert config.federation.rounds == 10
    assert config.supervisor.devices == "cpu"
    assert config.supervisor.timeouts.train == 5 and config.supervisor.timeouts.load == 600
    assert config.task.args["lr"] == 0.1


def test_override_with_a_list_value() -> None:
    config = load_config(VALID, ["supervisor.devices=[{name: cuda:0, memory: 16GiB}]"])
    assert supervisor_kwargs(config)["devices"] == [{"name": "cuda:0", "memory": 16 * GiB}]


def test_override_makes_a_missing_section() -> None:
    config = load_config(MINIMAL, ["faults.probability=0.5", "output=elsewhere"])
    assert config.faults is not None and config.faults.probability == 0.5
    assert config.output == "elsewhere"


def test_apply_overrides_returns_a_copy() -> None:
    data = copy.deepcopy(VALID)
    result = apply_overrides(data, ["federation.rounds=7", "federation.min_clients="])
    assert result["federation"]["rounds"] == 7 and result["federation"]["min_clients"] is None
    assert data == VALID


def test_unknown_override_path_suggests_the_key() -> None:
    with pytest.raises(fedsup.ConfigError) as info:
        apply_overrides(VALID, ["federation.roundz=10", "supervizor.devices=cpu"])
    assert info.value.problems == [  # type: ignore[attr-defined]
        "federation.roundz: unknown key; did you mean 'rounds'?",
        "supervizor: unknown key; did you mean 'supervisor'?",
    ]


@pytest.mark.parametrize(("override", "expected"), [
    ("rounds", "'rounds': expected an override KEY=VALUE"),
    ("supervisor.devices.name=cuda:0", "supervisor.devices: holds a single value; set it whole"),
    ("faults.kinds=[exit", "faults.kinds: the value is not YAML"),
    ("task.class=!!python/name:os.system", "unsafe tags such as !!python/object are not allowed"),
])
def test_bad_overrides(override: str, expected: str) -> None:
    assert expected in str(problems_of(VALID, (override,)))


def test_override_problems_come_with_the_schema_problems() -> None:
    error = problems_of(VALID, ("federation.roundz=10", "federation.clients=0"))
    assert len(error.problems) == 2


# -- the catalog of bad configs: (id, data, text expected in the message)


@pytest.mark.parametrize(("data", "expected"), [pytest.param(d, e, id=i) for i, d, e in CATALOG])
def test_bad_config_is_reported(data: dict[str, Any], expected: str) -> None:
    error = problems_of(data)
    assert any(expected in p for p in error.problems), error.problems
    assert all(p in str(error) for p in error.problems)


def test_catalog_is_large_enough() -> None:
    assert len(CATALOG) >= 14


def test_every_problem_is_reported_at_once() -> None:
    data = changed("federation.clients", "ten")
    data = changed("faults.probability", 2, base=data)
    data = changed("supervisor.devices", "gpu", base=data)
    error = problems_of(data)
    assert len(error.problems) == 3
    message = str(error)
    assert "federation.clients: expected a whole number (got 'ten')" in message
    assert "faults.probability: must be at most 1.0 (got 2)" in message
    assert "supervisor.devices: expected 'auto', 'cpu'" in message
    assert message.startswith("config has 3 problems:\n")


def test_a_misspelt_required_key_is_reported_once() -> None:
    data = changed("federation.rounds", delete=True)
    data["federation"]["roundz"] = 5
    assert problems_of(data).problems == ["federation.roundz: unknown key; did you mean 'rounds'?"]


def test_imports_are_checked_only_after_the_schema_passes() -> None:
    data = changed("task.class", "nosuchmodule:Client", base=changed("federation.rounds", 0))
    assert problems_of(data).problems == ["federation.rounds: must be at least 1 (got 0)"]


# -- bad files


@pytest.mark.parametrize(("content", "expected"), [pytest.param(c, e, id=i) for i, c, e in FILES])
def test_bad_file_is_reported(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    error = problems_of(path)
    assert expected in str(error)
    assert str(path) in str(error)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path).problems == [f"{path}: no such config file"]
    assert problems_of(str(tmp_path)).problems == [f"{tmp_path}: is a directory, not a config file"]


def test_unsafe_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    problems_of(tmp_path / "run.yaml")
    assert not marker.exists()


def test_config_problems_pickle() -> None:
    error = problems_of(changed("federation.clients", 0))
    again = pickle.loads(pickle.dumps(error))
    assert again.problems == error.problems and str(again) == str(error)


# -- fuzzing: whatever comes in, the answer is a RunConfig or a ConfigError


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["auto", "cpu", "512MiB", "fedavg", "hang", "cuda:0", "a:B", "x.py:C"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def key_paths(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(data, dict):
        return []
    paths = []
    for key, value in data.items():
        paths.append((*prefix, key))
        paths += key_paths(value, (*prefix, key))
    return paths


PATHS = key_paths(VALID)


def mutate(data: dict[str, Any], path: tuple[str, ...], action: str, value: Any) -> None:
    target: Any = data
    for key in path[:-1]:
        if not isinstance(target, dict) or not isinstance(target.get(key), dict):
            return
        target = target[key]
    if action == "delete":
        target.pop(path[-1], None)
    elif action == "replace":
        target[path[-1]] = value
    else:
        target[path[-1] + "x"] = value


def check_outcome(source: Any, overrides: list[str]) -> None:
    try:
        config = load_config(source, overrides)
    except fedsup.ConfigError as exc:
        assert isinstance(exc, ConfigProblems) and exc.problems
        return
    assert isinstance(config, RunConfig)
    assert load_config(yaml.safe_load(to_yaml(config))) == config


# bench/soak.py raises this for the long fuzz (docs/reliability.md)
FUZZ_EXAMPLES = int(os.environ.get("FEDSUP_FUZZ_EXAMPLES", "200"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(PATHS), st.sampled_from(["delete", "replace", "add"]), json_values), max_size=4),
    overrides=st.lists(st.tuples(st.sampled_from([".".join(p) for p in PATHS] + ["x.y", ""]),
                                 st.text(max_size=10)).map("=".join), max_size=2),
)
def test_mutated_configs_load_or_raise_config_error(mutations: list[tuple[Any, str, Any]],
                                                   overrides: list[str]) -> None:
    data = copy.deepcopy(VALID)
    for path, action, value in mutations:
        mutate(data, path, action, value)
    check_outcome(data, overrides)


yaml_texts = st.one_of(
    st.text(max_size=80),
    json_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.lists(st.sampled_from(yaml.safe_dump(VALID).splitlines() + ["  - [", "!!binary x", "? [a]", "&a [*a]", "\t"]),
             max_size=12).map("\n".join),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_texts)
def test_random_yaml_loads_or_raises_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(path, [])



# -- bounded YAML: a size limit and a limit on what aliases add, each named with how to raise it


def alias_bomb(levels: int = 8) -> str:
    """A few hundred bytes that yaml.safe_load would turn into over 10**levels values: each list holds the one
    before it ten times."""
    lines = ["    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return yaml.safe_dump({**MINIMAL, "task": {"class": MINIMAL["task"]["class"]}}).replace(
        "task:\n", "task:\n  args:\n" + "\n".join(lines) + "\n", 1)


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = write(tmp_path, alias_bomb())
    assert len(path.read_bytes()) < 1000
    problems = problems_of(path).problems
    assert problems == [f"{path}: its aliases expand it by 1,234,567,800 values, more than the limit of 100,000 "
                        "(set FEDSUP_YAML_MAX_ALIAS_VALUES to raise it)"]


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ntask: &t {class: a:B, args: {me: *t}}\nfederation: {clients: 1, rounds: 1}\n")
    problems = problems_of(path).problems
    assert problems == [f"{path}: a value contains itself through an alias (a recursive structure)"]


def test_aliases_within_the_limit_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = yaml.safe_dump(VALID).replace("task:\n", "shared: &s [1, 2, 3]\ntask:\n", 1)
    data = yaml.safe_load(text)
    data.pop("shared")
    assert load_config(data) == load_config(yaml.safe_load(yaml.safe_dump(VALID)))
    monkeypatch.setenv("FEDSUP_YAML_MAX_ALIAS_VALUES", "0")
    plain = write(tmp_path, "name: x\nseed: &n 3\nfederation: {clients: *n, rounds: *n}\ntask: {class: a:B}\n")
    assert all("aliases" not in p for p in problems_of(plain).problems)  # scalars add nothing to count
    nested = write(tmp_path, "name: x\nd: &d [1]\ne: [*d]\n", "nested.yaml")
    assert "its aliases expand it by 1 value, more than the limit of 0" in problems_of(nested).problems[0]
    monkeypatch.setenv("FEDSUP_YAML_MAX_ALIAS_VALUES", str(10**6))
    config = load_config(write(tmp_path, alias_bomb(levels=4), "bomb.yaml"), check_imports=False)
    assert len(config.task.args["a4"]) == 10 and len(config.task.args["a4"][0][0][0]) == 10


def test_a_file_over_the_size_limit_is_refused_without_reading_it_all(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, yaml.safe_dump(VALID) + "#" * (2**20))
    assert problems_of(path).problems == [f"{path}: more than the limit of 1,048,576 bytes of YAML "
                                          "(set FEDSUP_YAML_MAX_BYTES to raise it)"]
    monkeypatch.setenv("FEDSUP_YAML_MAX_BYTES", str(2**21))
    assert load_config(path).name == VALID["name"]
    monkeypatch.setenv("FEDSUP_YAML_MAX_BYTES", "lots")
    assert problems_of(path).problems == ["FEDSUP_YAML_MAX_BYTES: expected a whole number of at least 0 (got 'lots')"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_config_over_either_limit_is_one_line_and_exit_2_from_the_command_line(tmp_path: Path,
                                                                                  command: str) -> None:
    bomb, big = write(tmp_path, alias_bomb(), "bomb.yaml"), write(tmp_path, "#" * (2**20 + 1), "big.yaml")
    for path, said in ((bomb, "its aliases expand it by 1,234,567,800 values"),
                       (big, "more than the limit of 1,048,576 bytes of YAML")):
        done = subprocess.run([sys.executable, "-m", "fedsup", command, str(path)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "runs").exists()  # nothing was started


def test_an_endless_config_file_is_read_only_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSUP_YAML_MAX_BYTES", "4096")
    assert "more than the limit of 4,096 bytes" in problems_of("/dev/zero").problems[0]


def test_an_override_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["[" + ", ".join(["*a"] * 10) + "]"] * 2000) + "]"
    problems = problems_of(VALID, (f"task.args.blob={bomb}",)).problems
    assert problems[0].startswith("task.args.blob: its aliases expand it by 200,000 values, more than the limit")
    monkeypatch.setenv("FEDSUP_YAML_MAX_BYTES", "100")
    problems = problems_of(VALID, (f"task.args.blob={'x' * 101}",)).problems
    assert problems[0].startswith("task.args.blob: more than the limit of 100 bytes of YAML")


@pytest.mark.timeout(120)
def test_a_large_legal_file_is_read_in_one_parse(tmp_path: Path) -> None:
    """Just under the limit: a 1 MB list in task.args is read (and its keys checked) without parsing twice."""
    values = ", ".join(str(i % 10000) for i in range(170_000))
    path = write(tmp_path, yaml.safe_dump({k: v for k, v in VALID.items() if k != "task"})
                 + f"task:\n  class: {VALID['task']['class']}\n  args: {{weights: [{values}]}}\n")
    assert 900_000 < path.stat().st_size < 2**20
    from fedsup.engine import yamlbounds
    from fedsup.federated import problems as problems_module

    calls: list[int] = []
    real = yamlbounds.Loader.get_single_node
    monkey = pytest.MonkeyPatch()
    monkey.setattr(yamlbounds.Loader, "get_single_node", lambda self: calls.append(1) or real(self))
    try:
        data = problems_module.read_file(path)
    finally:
        monkey.undo()
    assert len(data["task"]["args"]["weights"]) == 170_000 and calls == [1]


def test_task_labels_and_supervisor_limits_reach_the_clients_and_the_supervisor() -> None:
    data = changed("supervisor.limits", {"download": 2}, base=changed("task.labels", ["download"]))
    config = load_config(data)
    assert supervisor_kwargs(config)["limits"] == {"download": 2}
    assert fedsup.Supervisor(**supervisor_kwargs(config)).policy.limits == {"download": 2}
    problems = problems_of(changed("supervisor.limits", {"downlaod": 2}, base=changed("task.labels", ["download"])))
    assert "supervisor.limits.downlaod" in str(problems) and "is not one of task.labels (download)" in str(problems)
    assert "supervisor.limits.x: must be at least 1 (got 0)" in str(problems_of(changed("supervisor.limits", {"x": 0})))
