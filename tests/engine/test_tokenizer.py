"""Start-up without transformers: ``mopt.engine.tokenizer`` gives the ids, text and chat prompts
transformers' ``AutoTokenizer`` gives, declines the folders transformers would treat differently, and
loading a model and generating from it imports no transformers module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mopt.engine.tokenizer import FastTokenizer, load_fast_tokenizer

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
NS_TEMPLATE = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
               "{{ bos_token }}{{ m['role'] | upper }}: {{ m['content'] | tojson }}\n{% endfor %}"
               "{% if add_generation_prompt %}#{{ ns.n }}>{% endif %}")
TEXTS = ["Hello", " héllo  wörld 🙂\n", "<|im_start|>user\nhi<|im_end|>", "", "<eos>x"]
CONVERSATIONS = [[{"role": "user", "content": "Hi there"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "Because."}, {"role": "user", "content": "ok 🙂"}]]


def _save(path, template: str | None, specials: dict[str, str], template_file: bool) -> None:
    """A byte-level tokenizer with ``<|im_start|>``/``<|im_end|>`` special tokens, saved by transformers."""
    from tiny_tokenizer import save_byte_tokenizer
    from transformers import AutoTokenizer

    save_byte_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("additional_special_tokens", None)
    config.pop("extra_special_tokens", None)
    config.update(specials)
    if template is not None and not template_file:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and template_file:
        (path / "chat_template.jinja").write_text(template)


FOLDERS = {
    "plain": (None, {}, False),
    "smollm2-like": (SMOL_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                                     "unk_token": "<eos>"}, True),
    "namespace-tojson": (NS_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<eos>"}, False),
}


@pytest.mark.parametrize("name", FOLDERS)
def test_same_ids_text_and_chat_prompts_as_transformers(name, tmp_path):
    from transformers import AutoTokenizer

    _save(tmp_path, *FOLDERS[name])
    fast, theirs = load_fast_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(fast, FastTokenizer)
    assert type(theirs).__name__ == "TokenizersBackend"
    assert fast.eos_token_id == theirs.eos_token_id and fast.chat_template == theirs.chat_template
    for text in TEXTS:
        for special in (True, False):
            ids = fast(text, add_special_tokens=special)["input_ids"]
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    if fast.chat_template:
        for conversation in CONVERSATIONS:
            for gen in (True, False):
                assert fast.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False) == \
                    theirs.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)


@pytest.mark.parametrize("change", [
    {"add_bos_token": True},
    {"add_eos_token": False},
    {"tokenizer_class": "LlamaTokenizer"},
    {"clean_up_tokenization_spaces": True},
    {"split_special_tokens": True},
    {"eos_token": "<not-a-token>"},
    {"eos_token": {"content": "<eos>", "special": True}},
    {"chat_template": [{"name": "default", "template": "x"}]},
    {"chat_template": "{% generation %}{{ messages }}{% endgeneration %}"},
])
def test_declines_folders_transformers_treats_differently(change, tmp_path):
    _save(tmp_path, None, {}, False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert load_fast_tokenizer(tmp_path) is None


def test_generate_path_imports_no_transformers(chat_model_dir):
    """Loading a (ModelOpt-free) checkpoint, templating a chat and generating: transformers stays unimported."""
    script = textwrap.dedent(f"""
        import sys
        from mopt import LLM, SamplingParams
        llm = LLM({str(chat_model_dir)!r}, device="cpu", max_model_len=64)
        out = llm.chat([{{"role": "user", "content": "hi"}}], SamplingParams(max_tokens=3, temperature=0))
        assert len(out[0].token_ids) == 3
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
