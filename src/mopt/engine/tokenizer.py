"""A checkpoint's tokenizer, without importing transformers where the folder allows it.

``AutoTokenizer`` costs seconds of start-up (transformers' import and its tokenizer classes). A
folder whose tokenizer is a plain ``tokenizer.json`` (``tokenizer_class`` ``TokenizersBackend`` or
``PreTrainedTokenizerFast``, every named special token among its added tokens, nothing that makes
transformers rewrite it: BOS/EOS flags, truncation, padding, space clean-up, split special tokens)
gives the same ids and text through the ``tokenizers`` library directly, and its chat template renders
with jinja2 the way transformers renders it. :class:`FastTokenizer` does what mopt asks of a tokenizer
(call, ``decode``, ``eos_token_id``, ``apply_chat_template`` of role/content messages) and hands
anything else to the transformers tokenizer, loaded on first use. Other folders load through
``AutoTokenizer`` as before (``tests/engine/test_tokenizer.py`` compares the two).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# tokenizer_config.json settings under which transformers changes what tokenizer.json does.
_REWRITING_KEYS = ("add_bos_token", "add_eos_token", "split_special_tokens", "clean_up_tokenization_spaces",
                   "add_prefix_space", "tokenizer_file", "fix_mistral_regex")
# transformers patches the pre-tokenizer regex of some large vocabularies (Mistral's); left to it.
_MAX_PLAIN_VOCAB = 100000


def _read(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(config: dict, added: dict[str, bool]) -> dict[str, str] | None:
    """``special_tokens_map`` as transformers builds it, or ``None`` when a token is not a plain string
    already among the special added tokens (transformers would add or change it)."""
    tokens = {}
    for name in _SPECIAL_NAMES:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not added.get(value, False):
            return None
        tokens[name] = value
    if config.get("additional_special_tokens") or config.get("extra_special_tokens"):
        return None  # special_tokens_map lists them under a name that varies by version: left to transformers
    return tokens


def _chat_template(path: Path, config: dict) -> str | None | bool:
    """The template text, ``None`` without one, ``False`` when it is one transformers must pick (named templates)."""
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file() or (path / "additional_chat_templates").exists():
        return False
    template = config.get("chat_template")
    return template if template is None or isinstance(template, str) else False


def load_fast_tokenizer(path: Path) -> "FastTokenizer | None":
    """The folder's tokenizer through ``tokenizers`` alone, or ``None`` when transformers must load it."""
    tok_file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
    if not (tok_file.is_file() and config_file.is_file()) or (path / "special_tokens_map.json").is_file():
        return None
    try:
        config, spec = _read(config_file), _read(tok_file)
    except (OSError, ValueError):
        return None  # transformers reports it in its own words
    if not isinstance(config, dict) or not isinstance(spec, dict) or config.get("tokenizer_class") not in _PLAIN_CLASSES:
        return None
    if any(config.get(k) for k in _REWRITING_KEYS) or "add_bos_token" in config or "add_eos_token" in config:
        return None
    if spec.get("truncation") is not None or spec.get("padding") is not None or spec.get("post_processor") is None:
        return None
    added = {t.get("content"): bool(t.get("special")) for t in spec.get("added_tokens") or []}
    for token in (config.get("added_tokens_decoder") or {}).values():
        if not isinstance(token, dict) or added.get(token.get("content")) != bool(token.get("special")):
            return None
    special = _special_tokens(config, added)
    template = _chat_template(path, config)
    if special is None or template is False or template and re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return None  # the {% generation %} tag needs transformers' assistant tracker
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tok_file))
    if backend.get_vocab_size() > _MAX_PLAIN_VOCAB:
        return None
    return FastTokenizer(path, backend, special, template)


def load_tokenizer(path: Path):
    """:class:`FastTokenizer` where the folder allows it, else transformers' ``AutoTokenizer``."""
    fast = load_fast_tokenizer(path)
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class FastTokenizer:
    """A ``tokenizer.json`` tokenizer with the interface mopt uses (see the module doc)."""

    def __init__(self, path: Path, backend, special_tokens: dict[str, str], chat_template: str | None) -> None:
        self.name_or_path = str(path)
        self.backend_tokenizer = backend
        self.special_tokens_map = special_tokens
        self.chat_template = chat_template
        for name in _SPECIAL_NAMES:
            token = special_tokens.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))
        self._hf = None

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict[str, list[int]]:
        if kwargs or not isinstance(text, str):
            return self._transformers()(text, add_special_tokens=add_special_tokens, **kwargs)
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs or not isinstance(token_ids, list) or not all(type(t) is int for t in token_ids):
            return self._transformers().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return self.backend_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True, **kwargs):
        plain = isinstance(messages, list) and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
        if kwargs or tokenize or not plain or not self.chat_template:
            return self._transformers().apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                            tokenize=tokenize, **kwargs)
        return _compiled(self.chat_template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens_map)

    def _transformers(self):
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.name_or_path)
        return self._hf

    def __getattr__(self, name: str):  # anything else a transformers tokenizer offers
        if name.startswith("__") or name == "_hf":
            raise AttributeError(name)
        return getattr(self._transformers(), name)


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str):
    """The template compiled as transformers compiles chat templates (sandboxed, the same filters and
    globals); the ``{% generation %}`` tag, only for assistant masks, is not supported here."""
    if template not in _TEMPLATES:
        from datetime import datetime

        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class TemplateDict:
            def __call__(self, *args, **kwargs):
                return dict(*args, **kwargs)

            def fromkeys(self, *args, **kwargs):
                return dict.fromkeys(*args, **kwargs)

        class TemplateNamespace(jinja2.utils.Namespace):
            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    TemplateNamespace._check_name(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name, value):
                TemplateNamespace._check_name(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check_name(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(
                        f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                           dict=TemplateDict(), namespace=TemplateNamespace)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
