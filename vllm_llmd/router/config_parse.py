"""The router's command line: `RouterConfig`'s fields as an argparse parser (`--help` in the
groups of `config.GROUPS`, each flag with its default and its variable), and parsed arguments
and `VLLM_LLMD_ROUTER_*` variables back into a checked `RouterConfig`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

from vllm_llmd.router.config import GROUPS, PROG, PodSpec, RouterConfig
from vllm_llmd.router.config_checks import args_error
from vllm_llmd.router.flags import (
    ENV_PREFIX,
    add_flags,
    flag_specs,
    parsed_values,
    unknown_env_vars,
)


def router_version() -> str:
    """This package's version: the installed `vllm-llmd` distribution's, else the source's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-llmd")
    except PackageNotFoundError:
        import vllm_llmd

        return str(getattr(vllm_llmd, "__version__", "unknown"))


def build_parser(
    environ: Mapping[str, str] | None = None,
    *,
    prog: str = PROG,
    description: str = "KV-cache-aware, load-aware, disaggregation-aware OpenAI proxy for vLLM.",
) -> argparse.ArgumentParser:
    """The router's CLI, generated from RouterConfig's fields (one argument group per flag
    group); with environ, a flag's `VLLM_LLMD_ROUTER_*` variable there is its default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--version] [--pod URL ...] [--FLAG VALUE ...]",  # not 40 lines
        description=description,
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT). "
        f"Check pods before serving them: {PROG} check --pod URL [--pod URL ...] [flags].",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {router_version()}")
    add_flags(parser, flag_specs(RouterConfig), environ or {}, GROUPS)
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Parse flags (and environment variables) into a RouterConfig."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    return config_from_args(parser, parser.parse_args(argv), environ)


def config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> RouterConfig:
    """The RouterConfig of parsed arguments (of `build_parser`, perhaps with more arguments);
    a bad value is a usage error (`parser.error`: one line, exit status 2)."""
    if unknown := unknown_env_vars(flag_specs(RouterConfig), environ):
        parser.error(f"environment variables that are no flag's: {'; '.join(unknown)}")
    defaults = {spec.dest: spec.default for spec in flag_specs(RouterConfig)}
    if (problem := args_error(args, defaults)) is not None:
        parser.error(problem)
    values = parsed_values(flag_specs(RouterConfig), args)
    values["log_level"] = values["log_level"].upper()
    try:
        values["pods"] = tuple(PodSpec.parse(text) for text in values["pods"])
    except ValueError as exc:
        parser.error(str(exc))
    config = RouterConfig(**values)
    try:
        config.slo_config()
        config.scoring_config()
    except ValueError as exc:
        parser.error(str(exc))
    return config
