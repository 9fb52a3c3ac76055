"""Tokenizers: HF tokenizers from a directory or hub id, a built-in byte tokenizer, chat templates
and the end-of-turn tokens at which critiques stop and rewards are read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from typing import List

from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cloud_jax import storage

# ChatML layout for tokenizers that ship without a chat template. The turn closer is the
# tokenizer's own eos_token rather than the literal "<|im_end|>": that string is several ordinary
# tokens in most vocabularies, while the reward must be read at one known token, and a base model's
# eos is one special token in every vocabulary that has one. Renders as
#   <|im_start|>user\nPROMPT{eos}\n<|im_start|>assistant\nRESPONSE{eos}\n...
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The byte tokenizer: ids 0-255 are the bytes of the UTF-8 text (id == byte value), then these
# special tokens. Its template renders
#   <bos><|user|>PROMPT<eot><|assistant|>RESPONSE<eot><|user|>CRITIQUE...<eot>
BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eot>", "<|system|>", "<|user|>", "<|assistant|>")
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIAL_TOKENS)
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<eot>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SENTINEL = "\ue000cloud-jax-turn\ue000"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over UTF-8 bytes (vocabulary of BYTE_VOCAB_SIZE), for tests and tiny models.

    Like Llama-3's, it adds <bos> when asked for special tokens and its chat template writes one
    too, so callers must keep exactly one (``layout`` does).
    """
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    # No merges and nothing but byte-fallback entries in the vocabulary: every character falls
    # back to the tokens of its UTF-8 bytes.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    core.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    bos_id = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eot>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=BYTE_CHAT_TEMPLATE)


# What a hub id looks like ("owner/name" or "name"); cloud_jax.checkpoints.hf.is_hub_id's form.
_HUB_ID_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?")


def load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    """"byte", a tokenizer directory (local, or a ``gs://`` / ``s3://`` URL, staged in the local
    cache: ``cloud_jax.storage.local_copy``) or a hub id -> a tokenizer with a chat template.

    Remote code is never run. A tokenizer without a chat template gets DEFAULT_CHAT_TEMPLATE.
    """
    if path_or_id == "byte":
        return byte_tokenizer()
    source = path_or_id
    if storage.is_url(path_or_id):
        storage.check_path(path_or_id, "tokenizer")
        source = storage.local_copy(path_or_id)
    elif not os.path.exists(path_or_id) and not _HUB_ID_FORM.fullmatch(path_or_id):
        # A path not made yet (.cache/smollm2-135m-instruct before `make smollm2`): the hub
        # client would judge it as a repository name ("Repo id must use alphanumeric chars").
        raise FileNotFoundError(f"no such directory here ({os.path.abspath(path_or_id)}), and "
                                f"{path_or_id!r} is not a hub id (owner/name)")
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if not tok.chat_template:
        if tok.eos_token is None:
            raise ValueError(
                f"tokenizer {path_or_id!r} has neither a chat template nor an eos token; add a "
                "chat_template to its tokenizer_config.json")
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _is_special(tok: PreTrainedTokenizerBase, token_id: int) -> bool:
    added = tok.added_tokens_decoder.get(token_id)
    return bool(added is not None and added.special) or token_id in tok.all_special_ids


def turn_closer_after(tok: PreTrainedTokenizerBase, text_after_content: str, where: str) -> int:
    """The token that closes a turn: the first token the template writes after a message's text."""
    ids = tok.encode(text_after_content, add_special_tokens=False)
    if not ids or not _is_special(tok, ids[0]):
        if text_after_content.lstrip().startswith(_INST_CLOSER):
            raise ValueError(_inst_closer_message(tok, text_after_content, where))
        raise ValueError(
            f"the chat template closes {where} with {text_after_content[:40]!r}, which does not "
            "start with a special end-of-turn token; rewards are read at that token, so use a "
            "template whose turns end with one (e.g. <|eot_id|>, <|im_end|>, or eos_token)")
    return ids[0]


# The text that closes a user turn in the [INST] templates (Llama-2-chat, Mistral-Instruct).
_INST_CLOSER = "[/INST]"


def _inst_closer_message(tok: PreTrainedTokenizerBase, text_after_content: str,
                         where: str) -> str:
    """Why an [INST] template whose user turn is not closed by one special token is refused, and
    what to do. Llama-2-chat's and Mistral-Instruct v0.1/v0.2's write ``' [/INST]'``, ordinary
    tokens in their vocabularies (``'▁[', '/', 'INST', ']'``): there is no token at which a
    critique could stop and its reward be read, and ``']'`` ends ordinary text as well."""
    closer_ids = tok.encode(_INST_CLOSER, add_special_tokens=False)
    if len(closer_ids) == 1 and _is_special(tok, closer_ids[0]):
        why = (f"{_INST_CLOSER!r} is a special token to this tokenizer, but the template writes "
               "text before it (Mistral-Instruct v0.3's template, written for such tokenizers, "
               f"closes a user turn with {_INST_CLOSER!r} itself)")
    else:
        why = (f"{_INST_CLOSER!r} is {len(closer_ids)} ordinary tokens to this tokenizer, not one "
               "special token (as in the vocabularies of Llama-2-chat, Mistral-Instruct "
               "v0.1/v0.2, Mixtral-Instruct v0.1 and CodeLlama-Instruct)")
    return (
        f"the chat template closes {where} with {text_after_content[:40]!r}: an [INST] template "
        "(Llama-2-chat's or Mistral-Instruct v0.1/v0.2's) whose user turns do not end with one "
        f"special token; {why}. A critique is written in a user turn and ends, and its reward "
        "is read, at the special token that closes that turn, so this template cannot be used. "
        "Give the tokenizer another chat template: save it to a directory (save_pretrained) and "
        "delete its chat_template.jinja, or the \"chat_template\" entry of its "
        "tokenizer_config.json, so that cloud_jax uses its default ChatML-style template, whose "
        "turns end with eos_token; or write a template there whose turns each end with a special "
        "token (eos_token), and point data.tokenizer (a command's --tokenizer) at that directory")


# The date a chat template that writes "today" (``strftime_now``, as Llama-3.1/3.2's do in their
# system turn) is given when rows and prefills are rendered: the one Llama-3.1's template falls
# back to without strftime_now. With the real date, a data set tokenized on one day and a prefill
# rendered on another would differ for the same example, and a cached data set would not match
# a fresh one.
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


# A call such as strftime_now('%d %b %Y') in a template's source (its format a literal).
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def render_chat(tok: PreTrainedTokenizerBase, messages: List[dict]) -> str:
    """``messages`` through ``tok``'s chat template as text, any date it writes TEMPLATE_DATE:
    each ``strftime_now(format)`` of the template's source becomes that date's text (a template
    cannot be handed a function in place of strftime_now)."""
    template = tok.chat_template
    if isinstance(template, str) and "strftime_now" in template:
        fixed = _STRFTIME_CALL.sub(lambda m: json.dumps(TEMPLATE_DATE.strftime(m.group(2))),
                                   template)
        return tok.apply_chat_template(messages, tokenize=False, chat_template=fixed)
    return tok.apply_chat_template(messages, tokenize=False)


def render_around(tok: PreTrainedTokenizerBase, messages: List[dict], index: int) -> tuple:
    """Renders ``messages`` with message ``index``'s content replaced by a sentinel and returns
    (text before, text after) it. Cutting at a sentinel finds where a template puts a message's
    text whatever the template looks like."""
    marked = [dict(m) for m in messages]
    marked[index]["content"] = _SENTINEL
    text = render_chat(tok, marked)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not write message content verbatim; it cannot "
                         "be used for the critique layout")
    before, after = text.split(_SENTINEL)
    return before, after


def end_of_turn_ids(tok: PreTrainedTokenizerBase) -> List[int]:
    """Tokens that end a turn, the one closing a user turn first (where critiques stop and the
    reward is read), then the assistant-turn closer and eos (further stop tokens). Llama-3:
    [<|eot_id|>, <|end_of_text|>]; ChatML: [<|im_end|>, eos]; byte tokenizer: [<eot>]."""
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    ids = [turn_closer_after(tok, render_around(tok, convo, 2)[1], "a user turn"),
           turn_closer_after(tok, render_around(tok, convo, 1)[1], "an assistant turn")]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(ids))


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, specials and template."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    extra = json.dumps([tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token,
                        type(tok).__name__])
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()
