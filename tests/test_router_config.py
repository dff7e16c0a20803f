"""The router's flags come from one typed config (RouterConfig's fields), and the router's
production code does not import the devtools."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from vllm_llmd.router.cli import main
from vllm_llmd.router.config import GROUPS, RouterConfig
from vllm_llmd.router.config_parse import build_parser, parse_config
from vllm_llmd.router.flags import flag, flag_specs, grouped

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_llmd"
POD = ["--pod", "http://127.0.0.1:1"]


def test_every_field_is_a_flag_whose_parser_default_is_the_fields():
    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "version")}
    specs = flag_specs(RouterConfig)
    assert [s.field for s in specs] == [f.name for f in dataclasses.fields(RouterConfig)]
    assert {s.dest for s in specs} == set(actions)
    for spec in specs:
        action = actions[spec.dest]
        assert action.option_strings == spec.options
        assert action.help == spec.help_text().replace("%", "%%")
        assert spec.help in action.help and spec.env in action.help
        if not spec.repeatable:
            assert action.default == spec.default, spec.option
    # a config parsed from nothing but a pod is the dataclass's defaults
    config = parse_config(POD, environ={})
    expected = RouterConfig(pods=config.pods)
    assert config == expected


def test_a_switch_on_by_default_is_turned_off_by_its_no_form():
    assert parse_config(POD, environ={}).kv_room  # on by default
    assert not parse_config([*POD, "--no-kv-room"], environ={}).kv_room
    assert not parse_config(POD, environ={"VLLM_LLMD_ROUTER_KV_ROOM": "off"}).kv_room
    assert parse_config([*POD, "--kv-room"], environ={"VLLM_LLMD_ROUTER_KV_ROOM": "0"}).kv_room


def test_flag_types_come_from_the_field_annotations():
    specs = {s.option: s for s in flag_specs(RouterConfig)}
    assert specs["--port"].value_type is int and specs["--w-load"].value_type is float
    assert specs["--slo-ttft-ms"].value_type is float  # float | None
    assert specs["--audit-prompts"].is_switch
    assert specs["--pod"].repeatable and specs["--pod"].env == "VLLM_LLMD_ROUTER_POD"
    assert specs["--objective"].repeatable
    with pytest.raises(SystemExit):
        parse_config([*POD, "--port", "eighty"], environ={})


def test_environment_sets_every_kind_of_flag_and_the_flag_wins():
    environ = {
        "VLLM_LLMD_ROUTER_POD": "http://a:1 http://b:1,role=prefill",
        "VLLM_LLMD_ROUTER_PORT": "9001",
        "VLLM_LLMD_ROUTER_AUDIT_PROMPTS": "yes",
        "VLLM_LLMD_ROUTER_OBJECTIVE": "chat=2 batch=-1",
        "VLLM_LLMD_ROUTER_SLO_TTFT_MS": "250",
    }
    config = parse_config([], environ=environ)
    assert [p.url for p in config.pods] == ["http://a:1", "http://b:1"]
    assert config.pods[1].role == "prefill"
    assert config.port == 9001 and config.audit_prompts is True
    assert config.objective == ("chat=2", "batch=-1") and config.slo_ttft_ms == 250.0
    assert parse_config(["--port", "9002"], environ=environ).port == 9002


def test_a_misspelled_environment_variable_is_refused_with_a_suggestion(capsys):
    # Before, VLLM_LLMD_ROUTER_POLICYY=slo was ignored without a word (the default policy ran).
    with pytest.raises(SystemExit):
        parse_config(POD, environ={"VLLM_LLMD_ROUTER_POLICYY": "slo", "OTHER_VAR": "x"})
    err = capsys.readouterr().err
    assert "VLLM_LLMD_ROUTER_POLICYY (did you mean VLLM_LLMD_ROUTER_POLICY?)" in err
    assert "OTHER_VAR" not in err


def test_a_misspelled_policy_and_a_model_id_as_tokenizer_are_clear_errors(capsys):
    # Before, both ended in a traceback once the router was being built.
    with pytest.raises(SystemExit):
        parse_config([*POD, "--policy", "kvaware"], environ={})
    err = capsys.readouterr().err
    assert "--policy 'kvaware' is not one of" in err and "(did you mean kv_aware?)" in err
    with pytest.raises(SystemExit) as exited:
        main([*POD, "--tokenizer", "Qwen/Qwen2.5-1.5B"])
    assert "vllm-llmd-router: error: Qwen/Qwen2.5-1.5B is not a model folder" in str(exited.value)


def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(capsys):
    # Before, int() raised a bare ValueError (a traceback naming no flag) for the environment;
    # then argparse named the flag but not the variable; a misspelled "true" was off.
    for environ, message in (
        ({"VLLM_LLMD_ROUTER_MAX_QUEUE": "many"}, "VLLM_LLMD_ROUTER_MAX_QUEUE='many': --max-queue"),
        ({"VLLM_LLMD_ROUTER_PORT": "abc"}, "VLLM_LLMD_ROUTER_PORT='abc': --port takes int"),
        ({"VLLM_LLMD_ROUTER_NO_INGEST": "ture"}, "VLLM_LLMD_ROUTER_NO_INGEST='ture' is neither"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_config(POD, environ=environ)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert parse_config(POD, environ={"VLLM_LLMD_ROUTER_NO_INGEST": "off"}).no_ingest is False


def test_validation_messages_name_the_flag(capsys):
    for argv, message in (
        (["--k8s-port", "http"], "--k8s-port needs --k8s-label-selector"),
        (["--shared-tier-ttl-s", "0"], "--shared-tier-ttl-s must be > 0, got 0.0"),
        (["--redis-timeout-s", "-1"], "--redis-timeout-s must be > 0, got -1.0"),
        (["--tokenize-workers", "0"], "--tokenize-workers must be >= 1, got 0"),
        (["--health-timeout-s", "0"], "--health-timeout-s must be > 0, got 0.0"),
        (["--health-timeouts-to-evict", "0"], "--health-timeouts-to-evict must be >= 1, got 0"),
        (["--epp-fallbacks", "-1"], "--epp-fallbacks must be >= 0 (0: off), got -1"),
        (["--replicate-hot-prefixes", "-2"], "--replicate-hot-prefixes must be >= 0 (0: off)"),
        (["--replicate-hot-prefixes", "3"], "--replicate-hot-prefixes needs --tokenizer"),
        (["--replicate-per-minute", "0"], "--replicate-per-minute must be >= 1, got 0"),
        (["--prefill-pace-tokens", "-1"], "--prefill-pace-tokens must be >= 0 (0: off)"),
    ):
        with pytest.raises(SystemExit):
            parse_config([*POD, *argv], environ={})
        assert message in capsys.readouterr().err


def test_an_unsupported_field_type_is_refused_when_flags_are_derived():
    @dataclasses.dataclass
    class Bad:
        ratio: complex = flag(0j, "not a flag type", group="x")

    with pytest.raises(TypeError, match="ratio"):
        flag_specs(Bad)


def test_help_lists_the_flags_by_group_with_default_and_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    # every group is a section, in GROUPS' order, and every field is in one of them
    positions = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    assert sum(len(specs) for _, specs in grouped(flag_specs(RouterConfig), GROUPS)) == len(
        dataclasses.fields(RouterConfig)
    )
    serving = text[text.index("\nserving:\n") : text.index("\npods and discovery:\n")]
    assert "--port" in serving and "--pod " not in serving
    flat = " ".join(text.split())  # argparse wraps the help
    assert "port to listen on [default: 8000; env: VLLM_LLMD_ROUTER_PORT]" in flat
    # no default said where there is none (unset, a switch that is off)
    assert "[env: VLLM_LLMD_ROUTER_TOKENIZER]" in flat
    assert "[env: VLLM_LLMD_ROUTER_AUDIT_PROMPTS]" in flat
    assert "[default: INFO; env: VLLM_LLMD_ROUTER_LOG_LEVEL]" in flat
    assert "vllm-llmd-router check --pod URL" in flat  # the epilog names the subcommand


def test_a_flag_in_no_listed_group_is_refused():
    @dataclasses.dataclass
    class Odd:
        size: int = flag(1, "a size", group="elsewhere")

    with pytest.raises(ValueError, match="elsewhere"):
        grouped(flag_specs(Odd), ("serving",))


def test_version_prints_the_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"vllm-llmd-router {version('vllm-llmd')}"


def test_log_level_and_access_log_are_checked(capsys):
    assert parse_config(POD, environ={}).log_level == "INFO"
    assert parse_config([*POD, "--log-level", "debug"], environ={}).log_level == "DEBUG"
    environ = {"VLLM_LLMD_ROUTER_LOG_LEVEL": "Warning"}
    assert parse_config(POD, environ=environ).log_level == "WARNING"
    assert parse_config(POD, environ={}).access_log == "requests"
    assert parse_config([*POD, "--access-log", "off"], environ={}).access_log == "off"
    for argv, message in (
        (["--log-level", "verbose"], "--log-level must be one of DEBUG, INFO, WARNING, ERROR"),
        (["--access-log", "some"], "--access-log must be one of all, requests, off, got 'some'"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_config([*POD, *argv], environ={})
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_a_bad_chat_template_is_a_one_line_usage_error(tmp_path, capsys):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = ["--tokenizer", str(tmp_path)]
    for argv, message in (
        (
            [*tokenizer, "--chat-template", str(tmp_path / "missing.jinja")],
            f"--chat-template {tmp_path}/missing.jinja: cannot read it (No such file or directory)",
        ),
        (
            [*tokenizer, "--chat-template", str(tmp_path)],
            f"--chat-template {tmp_path}: cannot read it (Is a directory)",
        ),
        (
            [*tokenizer, "--chat-template", str(broken)],
            f"--chat-template {broken}: the template does not compile (line 1:",
        ),
        (["--chat-template", str(good)], "--chat-template needs --tokenizer"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([*POD, *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert err.count("\n") == 2, err  # usage, then the one error line
    config = parse_config([*POD, *tokenizer, "--chat-template", str(good)], environ={})
    assert config.chat_template == str(good)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_router_does_not_import_devtools():
    # devtools (test launchers, clients) may import production code, never the reverse; the
    # router read Prometheus text through devtools.client before vllm_llmd/prometheus_text.py.
    modules = [*PACKAGE.glob("*.py"), *(PACKAGE / "router").rglob("*.py")]
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in modules
        if any(name.startswith("vllm_llmd.devtools") for name in _imports(path))
    ]
    assert offenders == []
