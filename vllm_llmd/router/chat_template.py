"""Chat messages and templates as vLLM 0.32 hands them to the tokenizer (`renderers/`,
`entrypoints/chat_utils.py`): message normalization for text content, the template's content
format detected from its AST, the template kwargs vLLM passes on and merges.

Rendering a template is running code: the router renders only the pods' own templates unless
told to trust request templates (`client_body`), and always off its event loop (`off_loop`).
"""

from __future__ import annotations

import codecs
import inspect
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

# text content part types and the field holding their text (vLLM's TEXT_PART_TYPES)
_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "thinking": "thinking",
    "refusal": "refusal",
}
_CLAUDE_CODE_BILLING_HEADER = "x-anthropic-billing-header"


class UnsupportedRequestError(ValueError):
    """The request cannot be tokenized as the pod would (multimodal, batch, embeds, ...)."""


def load_chat_template(value: str) -> str:
    """The template of a `--chat-template` value, read and compiled as vLLM's
    `load_chat_template` does: a file's text, or the value itself when it cannot be opened and
    looks like a template (it has `{`, `}` or a newline; its backslash escapes decoded).

    Raises:
        ValueError: one line saying why (unreadable file, a template that does not compile).
    """
    literal = any(c in value for c in "{}\n")  # not a file name, if it cannot be opened
    shown = repr(value if len(value) <= 60 else value[:57] + "...") if literal else value
    try:
        with open(value, encoding="utf-8") as file:
            template = file.read()
    except UnicodeDecodeError:
        raise ValueError(f"{shown}: not a UTF-8 text file") from None
    except OSError as exc:
        if not literal:
            raise ValueError(f"{shown}: cannot read it ({exc.strerror or exc})") from None
        template = codecs.decode(value, "unicode_escape")
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"{shown}: the template does not compile (line {exc.lineno}: {exc.message})"
        ) from None
    except jinja2.TemplateError as exc:
        raise ValueError(f"{shown}: the template does not compile ({exc})") from None
    return template


def apply_chat_template_params(tokenizer: Any) -> frozenset[str]:
    # vLLM passes a chat kwarg on if apply_chat_template or the template names it.
    params = inspect.signature(type(tokenizer).apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named - {"chat_template", "tokenize", "self"})


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(_parse_template(template)))


def _parse_template(template: str) -> Any:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).environment.parse(template)


@lru_cache(maxsize=32)
def detect_content_format(template: str) -> str:
    """vLLM's `_detect_content_format`: "openai" if the template loops over message content.

    Such templates get content as a list of `{"type": "text", "text": ...}` parts; the others
    get one string.
    """
    import jinja2.nodes as nodes

    try:
        root = _parse_template(template)
    except Exception:
        return "string"
    names = ["messages"]  # names bound to messages (or slices/filters of it)
    for name in names:
        for assign in root.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and _accesses(assign.node, name):
                if assign.target.name not in names:
                    names.append(assign.target.name)
    message_vars = {
        loop.target.name
        for loop in root.find_all(nodes.For)
        if isinstance(loop.target, nodes.Name) and any(_accesses(loop.iter, n) for n in names)
    }
    in_macros: dict[int, set[str]] = {}  # loop id -> macro params fed a message's content
    for macro in root.find_all(nodes.Macro):
        params = {a.name for a in macro.args}
        fed: set[str] = set()
        for call in root.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name == macro.name:
                for arg, param in zip(call.args, macro.args, strict=False):
                    if any(_accesses(arg, v, "content") for v in message_vars):
                        fed.add(param.name)
                for kw in call.kwargs:
                    if kw.key in params and any(
                        _accesses(kw.value, v, "content") for v in message_vars
                    ):
                        fed.add(kw.key)
        for loop in macro.find_all(nodes.For):
            in_macros[id(loop)] = fed
    for loop in root.find_all(nodes.For):
        if any(_accesses(loop.iter, v, "content") for v in message_vars):
            return "openai"
        if isinstance(loop.iter, nodes.Name):
            fed_params = in_macros.get(id(loop))
            if fed_params is not None and loop.iter.name in fed_params:
                return "openai"
            if fed_params is None and loop.iter.name == "content":
                return "openai"
    return "string"


def _accesses(node: Any, var: str, key: str | None = None) -> bool:
    """Whether node reads `var` (or `var.key` / `var['key']`), through filters, tests, slices."""
    import jinja2.nodes as nodes

    if isinstance(node, (nodes.Filter, nodes.Test)):
        return node.node is not None and _accesses(node.node, var, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _accesses(node.node, var, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == var
    if isinstance(node, nodes.Getitem):
        return (
            _accesses(node.node, var)
            and isinstance(node.arg, nodes.Const)
            and node.arg.value == key
        )
    return isinstance(node, nodes.Getattr) and _accesses(node.node, var) and node.attr == key


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], content_format: str
) -> list[dict[str, Any]]:
    """Text chat messages as vLLM hands them to the template (`parse_chat_messages`)."""
    conversation = []
    for message in messages:
        role = message["role"]
        content = message.get("content")
        parts = [] if content is None else [content] if isinstance(content, str) else content
        if role == "system":
            parts = _strip_billing_header(parts)
        texts: list[Any] = []
        for part in parts:
            text = _text_part(part, wrap=content_format == "openai")
            if text is not None:
                texts.append(text)
        out: dict[str, Any] = {"role": role}
        out["content"] = texts if content_format == "openai" else "\n".join(texts)
        if role == "assistant":
            if message.get("tool_calls") is not None:
                out["tool_calls"] = _tool_calls(message["tool_calls"])
            if message.get("reasoning") is not None:
                out["reasoning"] = out["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
            if isinstance(out["content"], list):
                out["content"] = "\n".join(p["text"] for p in out["content"])
        for key in ("name", "task"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


def _text_part(part: Any, wrap: bool) -> Any:
    if isinstance(part, str):
        return {"type": "text", "text": part} if wrap else part
    kind = part.get("type") if isinstance(part, Mapping) else None
    field = _TEXT_PART_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is None:
        raise UnsupportedRequestError(f"chat content part {kind!r} is not text")
    text = part.get(field)
    if text is None:
        return None
    if not wrap:
        return text
    extra = {k: v for k, v in part.items() if k not in ("type", "text", "thinking", "refusal")}
    return {"type": "text", "text": text, **extra}


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    # vLLM drops Claude Code's per-request attribution line from system text (it would
    # break the prefix cache from there on).
    out = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text")
        if not (isinstance(text, str) and text.startswith(_CLAUDE_CODE_BILLING_HEADER)):
            out.append(part)
        elif rest := text.partition("\n")[2]:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _tool_calls(tool_calls: list[Any]) -> list[Any] | None:
    calls = []
    for call in tool_calls:
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {}
        function["arguments"] = arguments if isinstance(arguments, dict) else {}
        call["function"] = function
        calls.append(call)
    return calls


def developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # vLLM: templates without a developer role get those messages as system, merged first.
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {k: v for k, v in message.items() if k != "tools"} | {"role": "system"}
        converted.append(message)
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if not systems or systems == [0]:
        return converted
    contents = []
    for i in systems:
        content = converted[i].get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] if isinstance(p, dict) else p for p in content)
        if content:
            contents.append(content)
    rest = [m for m in converted if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def merge_kwargs(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in overrides.items() if v is not None and v != "auto"}}
