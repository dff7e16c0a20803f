"""Requests to vLLM block hashes: tokenize exactly as the pod's OpenAI server, then hash.

The router's read path starts here (llm-d's TokenProcessor): an OpenAI request body becomes
the token ids the engine will see and the hashes of its full blocks, in the int form KV events
publish, so the index can look them up. Tokenization mirrors vLLM 0.32 (`renderers/`,
`entrypoints/openai/*/protocol.py`):

- `/v1/completions`: a string prompt is encoded with `tokenizer(prompt, add_special_tokens=...)`
  (the request's flag, default True: BOS and friends as the tokenizer's post-processor adds
  them); a list of token ids passes through untouched.
- `/v1/chat/completions`: messages are normalized as vLLM's `parse_chat_messages` does for text
  (content parts joined with "\\n" for "string"-format templates, kept as `{"type": "text"}`
  parts for "openai"-format ones, the format detected from the template's AST as vLLM does;
  "developer" turns become "system" for templates without that role). The template is then
  rendered to *text* (`preprocess_chat` passes `tokenize=False` for HF tokenizers) with
  `add_generation_prompt` (default True), `continue_final_message` and the template kwargs,
  merged as vLLM merges them (request fields > `chat_template_kwargs` > the server's
  `--default-chat-template-kwargs`); the text is encoded with the request's
  `add_special_tokens`, default False: the template already wrote BOS and friends. A request
  carrying `kv_transfer_params["prompt_token_ids"]` (P/D decode reuse) keeps those ids (the
  router passes such params on only from a trusted upstream: see `client_body`).

Tokenizing can be slow (a long prompt, a trusted request's own template): the router calls
`tokenize_request` off its event loop, bounded (`off_loop`).

Not covered (the router then has no cache estimate; it still routes on load): multimodal
content, prompt embeds, batched completion prompts, LoRA adapters (their path enters the
hash), `truncate_prompt_tokens`. Tool definitions are passed to the template as given, which
matches vLLM when the template does not print the tool JSON verbatim.

`verify_against_pod` checks all of this against a live pod (`POST /tokenize` for both
endpoints, block size and hash algorithm from `vllm:cache_config_info`), and
`verify_stored_event` checks block hashes (algorithm, seed, block size) against a `BlockStored`
event the pod published. The router must not route on cache affinity to a pod that fails them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_llmd.hashing import DEFAULT_HASH_ALGORITHM, EventBlockHash, PrefixHasher
from vllm_llmd.router import pod_verification
from vllm_llmd.router.chat_template import (
    UnsupportedRequestError,
    apply_chat_template_params,
    detect_content_format,
    developer_to_system,
    merge_kwargs,
    normalize_messages,
    template_variables,
)
from vllm_llmd.router.pod_verification import PROBE_MESSAGES, PROBE_TEXT, HashVerification

__all__ = [
    "PROBE_MESSAGES",
    "PROBE_TEXT",
    "HashVerification",
    "TokenProcessor",
    "TokenizedRequest",
    "UnsupportedRequestError",
    "detect_content_format",
    "normalize_messages",
]

# chat request fields that change the prompt (vLLM's build_chat_params / build_tok_params)
# the hasher's block size until the pods' is known (nothing is hashed with it meanwhile)
PROVISIONAL_BLOCK_SIZE = 16
_CHAT_OPTIONS = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "documents",
    "reasoning_effort",
)


@dataclass(frozen=True, slots=True)
class TokenizedRequest:
    """The engine's view of one request: its prompt tokens and their full blocks' hashes."""

    token_ids: list[int]
    # one per full block of token_ids, as KV events publish them (64-bit ints)
    block_hashes: list[EventBlockHash]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


class TokenProcessor:
    """Tokenizes OpenAI requests with the model's own tokenizer and hashes their blocks.

    Args:
        model_path: local model folder (tokenizer.json / tokenizer_config.json); never the hub.
        block_size: the pods' block size (tokens per hashed block); None: the first pod's
            (`adopt_pod_settings`, from its `vllm:cache_config_info`), no hashes until then.
        hash_algorithm: the pods' `--prefix-caching-hash-algo`; None: the first pod's, else
            vLLM's default.
        hash_seed: the pods' PYTHONHASHSEED (default: ours, then vLLM's fixed sha256 seed).
        chat_template: the pods' `--chat-template` text, if they override the model's.
        chat_template_content_format: the pods' `--chat-template-content-format`.
        default_chat_template_kwargs: the pods' `--default-chat-template-kwargs`.
    """

    def __init__(
        self,
        model_path: str | Path,
        block_size: int | None,
        hash_algorithm: str | None = DEFAULT_HASH_ALGORITHM,
        hash_seed: str | None = None,
        *,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        default_chat_template_kwargs: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model_path = Path(model_path)
        # the settings to take from the first pod that says them (None: given on the command line)
        self._pod_block_size = block_size is None
        self._pod_algorithm = hash_algorithm is None
        self._hash_seed = hash_seed
        self.hasher = PrefixHasher(
            block_size or PROVISIONAL_BLOCK_SIZE,
            hash_algorithm or DEFAULT_HASH_ALGORITHM,
            hash_seed,
        )
        self.tokenizer = _load_tokenizer(self.model_path, trust_remote_code)
        self._chat_template = chat_template
        self._default_kwargs = dict(default_chat_template_kwargs or {})
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                f"chat_template_content_format must be auto, string or openai, "
                f"not {chat_template_content_format!r}"
            )
        self._content_format = chat_template_content_format
        self._chat_kwarg_names = apply_chat_template_params(self.tokenizer)

    @property
    def block_size(self) -> int:
        return self.hasher.block_size

    @property
    def settings_known(self) -> bool:
        """Block size and hash algorithm are given or taken from a pod: hashes can match."""
        return not (self._pod_block_size or self._pod_algorithm)

    def adopt_pod_settings(self, block_size: int | None, algorithm: str | None) -> list[str]:
        """Take the settings not given on the command line from a pod's cache_config_info
        (the first pod that says them: later pods are checked against them). What was taken;
        ValueError (nothing taken) for an algorithm the router cannot compute."""
        take_size = self._pod_block_size and block_size is not None
        if not (take_size or self._pod_algorithm):
            return []
        size = block_size if take_size and block_size is not None else self.hasher.block_size
        # a pod too old to say its algorithm hashes with vLLM's default
        name = (
            (algorithm or DEFAULT_HASH_ALGORITHM) if self._pod_algorithm else self.hasher.algorithm
        )
        hasher = PrefixHasher(size, name, self._hash_seed)
        taken = [f"block size {size}"] if take_size else []
        taken += [f"hash algorithm {name}"] if self._pod_algorithm else []
        # the hasher first: a request tokenized meanwhile (another thread) never hashes with
        # the provisional one once the settings count as known
        self.hasher = hasher
        self._pod_block_size = self._pod_block_size and not take_size
        self._pod_algorithm = False
        return taken

    # ---- tokenization ----------------------------------------------------------------------

    def completion_token_ids(self, prompt: object, *, add_special_tokens: bool = True) -> list[int]:
        """The prompt tokens of a /v1/completions request (one prompt: a string or token ids,
        as a client sent it; anything else is an UnsupportedRequestError)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise UnsupportedRequestError("a completion prompt is a string or a list of token ids")

    def chat_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """The prompt tokens of a /v1/chat/completions request (text messages only)."""
        template = self._resolve_template(chat_template, tools)
        content_format = self._content_format
        if content_format == "auto":
            content_format = detect_content_format(template)
        conversation = normalize_messages(messages, content_format)
        if any(m["role"] == "developer" for m in conversation) and not (
            '"developer"' in template or "'developer'" in template
        ):
            conversation = developer_to_system(conversation)
        extra: dict[str, Any] = dict(
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=documents,
            reasoning_effort=reasoning_effort,
        )
        request_kwargs = dict(chat_template_kwargs or {})
        if request_kwargs.keys() & {"chat_template", "tokenize"}:
            raise UnsupportedRequestError("chat_template_kwargs may not set chat_template/tokenize")
        if reasoning_effort is not None and "enable_thinking" not in request_kwargs:
            extra["enable_thinking"] = reasoning_effort != "none"
        # vLLM's merge_kwargs, twice: request fields over chat_template_kwargs over the
        # server's defaults, where None or "auto" leaves the value below in place
        kwargs = merge_kwargs(self._default_kwargs, merge_kwargs(request_kwargs, extra))
        accepted = self._chat_kwarg_names | template_variables(template)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        text = self.tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            chat_template=template,
            tokenize=False,
            return_dict=False,
            **kwargs,
        )
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def hash(self, token_ids: list[int], *, cache_salt: str | None = None) -> TokenizedRequest:
        """Hash the full blocks of token_ids as the pods do (none before the pods' block size
        is known: such requests are routed by load)."""
        if not self.settings_known:
            return TokenizedRequest(token_ids, [])
        return TokenizedRequest(
            token_ids, self.hasher.event_hashes(token_ids, cache_salt=cache_salt)
        )

    def tokenize_completion(
        self,
        prompt: object,
        *,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
    ) -> TokenizedRequest:
        """`completion_token_ids`, hashed."""
        ids = self.completion_token_ids(prompt, add_special_tokens=add_special_tokens)
        return self.hash(ids, cache_salt=cache_salt)

    def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        cache_salt: str | None = None,
        **options: Any,
    ) -> TokenizedRequest:
        """`chat_token_ids` (same options), hashed."""
        return self.hash(self.chat_token_ids(messages, **options), cache_salt=cache_salt)

    def tokenize_request(self, path: str, body: Mapping[str, Any]) -> TokenizedRequest:
        """Tokenize an OpenAI request body sent to `path` (/v1/completions or chat).

        Raises UnsupportedRequestError when the pod's tokens cannot be known here.
        """
        try:
            return self._tokenize_body(path.rstrip("/"), body)
        except UnsupportedRequestError:
            raise
        except Exception as exc:  # a malformed body or a template that raises: the pod decides
            raise UnsupportedRequestError(f"cannot tokenize the request: {exc!r}") from exc

    def _tokenize_body(self, path: str, body: Mapping[str, Any]) -> TokenizedRequest:
        salt = body.get("cache_salt")
        if path.endswith("/chat/completions"):
            reused = _reused_prompt_token_ids(body)
            if reused is not None:
                return self.hash(reused, cache_salt=salt)
            options = {k: body[k] for k in _CHAT_OPTIONS if body.get(k) is not None}
            return self.tokenize_chat(body.get("messages") or [], cache_salt=salt, **options)
        if path.endswith("/completions"):
            if body.get("prompt_embeds") is not None:
                raise UnsupportedRequestError("prompt_embeds requests have no token ids")
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                if len(prompt) != 1:
                    raise UnsupportedRequestError("batched completion prompts are not routed")
                prompt = prompt[0]
            special = body.get("add_special_tokens", True)
            return self.tokenize_completion(prompt, add_special_tokens=special, cache_salt=salt)
        raise UnsupportedRequestError(f"no tokenization rule for {path}")

    def _resolve_template(self, chat_template: str | None, tools: list[Any] | None) -> str:
        # vLLM's order: the request's template, the server's --chat-template, the tokenizer's.
        try:
            template: str = self.tokenizer.get_chat_template(
                chat_template or self._chat_template, tools=tools
            )
        except ValueError as exc:
            raise UnsupportedRequestError(f"no chat template: {exc}") from None
        return template

    # ---- verification (pod_verification) ---------------------------------------------------

    def verify_stored_event(
        self, token_ids: Sequence[int], block_hashes: Sequence[int], block_size: int
    ) -> HashVerification:
        """Recompute the hashes of a prefix-start `BlockStored` (parent None, no extra keys)."""
        return pod_verification.verify_stored_event(
            self.hasher, token_ids, block_hashes, block_size
        )

    async def verify_against_pod(
        self, pod_url: str, model: str, *, session: Any = None, timeout: float = 10.0
    ) -> HashVerification:
        """`pod_verification.verify_against_pod` with this processor."""
        return await pod_verification.verify_against_pod(
            self, pod_url, model, session=session, timeout=timeout
        )


def _load_tokenizer(model_path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    folder = model_path if model_path.is_dir() else _cached_model_folder(str(model_path))
    if folder is None:
        raise FileNotFoundError(
            f"{model_path} is not a model folder, nor a model id with a copy in this machine's "
            "Hugging Face cache; the router loads the tokenizer from a local copy of the served "
            f"model (no hub access): `huggingface-cli download {model_path}` first, or pass "
            "the folder vLLM serves from"
        )
    return AutoTokenizer.from_pretrained(
        folder, trust_remote_code=trust_remote_code, local_files_only=True
    )


def _cached_model_folder(model_id: str) -> Path | None:
    """The local snapshot of a hub model id (`org/name`, as `vllm serve` takes it) in the
    Hugging Face cache (HF_HOME / HF_HUB_CACHE), or None: never a download."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError, ValueError):
        return None


def _reused_prompt_token_ids(body: Mapping[str, Any]) -> list[int] | None:
    params = body.get("kv_transfer_params")
    ids = params.get("prompt_token_ids") if isinstance(params, Mapping) else None
    if ids is None or body.get("echo"):
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise UnsupportedRequestError("kv_transfer_params.prompt_token_ids is not a list of ints")
    return ids
