"""Layout version 3 on SentencePiece-style tokenizers (a word-start marker ``'▁'`` in front of
every text tokenized): a row holds the tokens of the whole rendered conversation, as
``apply_chat_template(..., tokenize=True)`` gives them, where version 2 tokenized each text on its
own and gave it a marker of its own. Two small tokenizers built here: Llama-2's legacy pipeline
(a normalizer that writes the marker, under the default ChatML template a base model gets) and a
Metaspace one with Mistral-v0.3-style ``[INST]`` control tokens and template."""

import string

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cloud_jax.data.layout import encode_critique_prefix, encode_example
from cloud_jax.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from cloud_jax.serving.protocol import ChatMarkers, parse_openrlhf

PREFIX = ("The following is a break down on the correctness and usefulness of the assistant's "
          "response to my question: ")
CASES = [  # prompt, response, critique
    ("What is 2+2?", "It is 4.", "The answer is correct and short."),
    ("Name a prime above 10.", "11 is prime.", " The response is right: 11 is prime."),
    ("Is the sky green?", "Yes, always.", "\nWrong: the sky is not green."),
]
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.3's, tools and system message left out
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}{% endfor %}")


def sentencepiece_tokenizer(style):
    specials = ["<unk>", "<s>", "</s>"] + (["[INST]", "[/INST]"] if style == "metaspace" else [])
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    # Merges learnt within "▁word" pieces, as SentencePiece's never cross a word start.
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    corpus = [PREFIX, "[INST] user assistant"] + [" ".join(c) for c in CASES]
    core.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=list("▁\n" + string.printable.strip())))
    if style == "legacy":  # Llama-2's tokenizer.json
        core.pre_tokenizer = None
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                normalizers.Replace(" ", "▁")])
        core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
    else:  # legacy=False tokenizers (Mistral v0.3)
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        core.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=specials[3:])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE if style == "legacy" else MISTRAL_TEMPLATE
    return tok


@pytest.fixture(scope="module", params=["legacy", "metaspace"])
def tok(request):
    return sentencepiece_tokenizer(request.param)


def _whole(tok, messages):
    """The conversation rendered and tokenized as one text, with the tokenizer's BOS first."""
    ids = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


@pytest.mark.parametrize("prompt,response,critique", CASES)
def test_rows_hold_the_tokens_of_the_whole_rendered_conversation(tok, prompt, response,
                                                                 critique):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
                {"role": "user", "content": PREFIX + critique}]
    whole = _whole(tok, messages)
    ex = encode_example(tok, prompt, response, critique, "critique", PREFIX, 512)
    ids = ex.input_ids.tolist()
    # The row ends at the critique turn's closing token; the template may write more after it.
    assert ids == whole[:len(ids)] and ex.reward_index == len(ids) - 1
    prefill = encode_critique_prefix(tok, prompt, response, PREFIX)
    assert ids[:len(prefill)] == prefill
    assert ex.target_mask.tolist() == [0] * len(prefill) + [1] * (len(ids) - len(prefill))
    classic = encode_example(tok, prompt, response, None, "classic", PREFIX, 512).input_ids
    assert classic.tolist() == _whole(tok, messages[:2])[:len(classic)]
    # Version 2 gave every text a word-start marker of its own: '▁' tokens the model never saw
    # in chat tuning ('[INST]', '▁', '▁What') or one in place of none ('\n', '▁What').
    v2 = encode_example(tok, prompt, response, critique, "critique", PREFIX, 512, version=2)
    assert v2.input_ids.tolist() != whole[:len(v2.input_ids)]


def test_truncate_prompt_cuts_the_prompt_tokens_in_context(tok):
    prompt, response, critique = CASES[0]
    full = encode_example(tok, prompt, response, critique, "critique", PREFIX, 512)
    cut = encode_example(tok, prompt, response, critique, "critique", PREFIX,
                         len(full.input_ids) - 2, "truncate_prompt")
    assert cut.prompt_tokens_cut == 2
    ids, kept = full.input_ids.tolist(), cut.input_ids.tolist()
    start = next(i for i in range(len(ids)) if ids[:i] + ids[i + 2:] == kept)
    # The two tokens cut are the prompt's first (its first word holding the space before it).
    assert prompt.startswith(tok.decode(ids[start:start + 2]).strip())
    assert tok.decode(ids[:start]).rstrip().endswith(("user", "[INST]"))


def test_a_special_token_string_in_a_row_stays_text(tok):
    prompt = "Say </s> and stop."
    ex = encode_example(tok, prompt, "ok", "Fine.", "critique", PREFIX, 512)
    plain = encode_example(tok, "Say and stop.", "ok", "Fine.", "critique", PREFIX, 512)
    # The template's own </s> tokens only: none from the prompt's text.
    eos = tok.eos_token_id
    assert ex.input_ids.tolist().count(eos) == plain.input_ids.tolist().count(eos)
    assert "</s> and stop" in tok.decode(ex.input_ids)


def test_get_reward_queries_reach_the_rows_the_model_was_trained_on(tok):
    """/get_reward takes the rendered chat apart into the user text and the response and lays
    them out as training does: the tokens scored are the training row's prefill."""
    prompt, response, _ = CASES[0]
    query = tok.apply_chat_template([{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}], tokenize=False)
    [item] = parse_openrlhf({"query": [query + tok.eos_token]}, ChatMarkers.of(tok))
    assert (item.prompt, item.response) == (prompt, response)
    assert encode_critique_prefix(tok, item.prompt, item.response, PREFIX) == \
        encode_critique_prefix(tok, prompt, response, PREFIX)


def test_get_reward_prompts_that_end_before_the_assistant_turn_s_space():
    """OpenRLHF sends the generation prompt beside each query. Mistral's ends at "[/INST]", and
    its template writes " " + response: the space is the template's. The response kept it
    (" It is 4."), and was scored as '[/INST]', '▁', '▁It', tokens it was not trained on."""
    tok = sentencepiece_tokenizer("metaspace")
    prompt, response, _ = CASES[0]
    generation_prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                tokenize=False, add_generation_prompt=True)
    query = tok.apply_chat_template([{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}], tokenize=False)
    assert query.startswith(generation_prompt + " ")
    [item] = parse_openrlhf({"query": [query], "prompts": [generation_prompt]},
                            ChatMarkers.of(tok))
    assert (item.prompt, item.response) == (prompt, response)
    assert encode_critique_prefix(tok, item.prompt, item.response, PREFIX) == \
        encode_critique_prefix(tok, prompt, response, PREFIX)


def test_a_tokenizer_without_offsets_gives_the_same_rows(tok, monkeypatch):
    """A Python ("slow") tokenizer has no character offsets: the text's tokens are found as those
    past the ones the joint text shares with the template piece alone, and the rows are those a
    fast tokenizer gives (the call for offsets would raise on such a tokenizer)."""
    fast = [(encode_example(tok, p, r, c, "critique", PREFIX, 512).input_ids.tolist(),
             encode_example(tok, p, r, None, "classic", PREFIX, 512).input_ids.tolist(),
             encode_critique_prefix(tok, p, r, PREFIX)) for p, r, c in CASES]
    calls = []
    original = type(tok).__call__

    def no_offsets(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            calls.append(kwargs)
            raise NotImplementedError("return_offset_mapping is not available when using Python "
                                      "tokenizers")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    monkeypatch.setattr(type(tok), "__call__", no_offsets)
    slow = [(encode_example(tok, p, r, c, "critique", PREFIX, 512).input_ids.tolist(),
             encode_example(tok, p, r, None, "classic", PREFIX, 512).input_ids.tolist(),
             encode_critique_prefix(tok, p, r, PREFIX)) for p, r, c in CASES]
    assert slow == fast and not calls


# A Zephyr-style template (TinyLlama-chat's, over Llama-2's legacy tokenizer) that writes the BOS
# first: '<s>' then '<|user|>', which the decode gives back as '<s> <|user|>'.
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def _openrlhf_request(tok, prompt, response, padding):
    """(query, prompt) as OpenRLHF sends them: the generation prompt rendered as text and
    tokenized without special tokens, the policy's sample (here the tokens the rendered
    conversation has past the prompt's, then the EOS) after it, the whole decoded with
    ``skip_special_tokens=False`` (before 0.8 a batch left- and right-padded with the pad token,
    the EOS where there is none); the prompt is the rendered text itself."""
    user = {"role": "user", "content": prompt}
    generation_prompt = tok.apply_chat_template([user], tokenize=False,
                                                add_generation_prompt=True)
    conversation = tok.apply_chat_template([user, {"role": "assistant", "content": response}],
                                           tokenize=False)
    prompt_ids = tok(generation_prompt, add_special_tokens=False)["input_ids"]
    ids = tok(conversation, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sequence = [pad] * padding + ids + [tok.eos_token_id] + [pad] * padding
    return tok.decode(sequence, skip_special_tokens=False), generation_prompt


@pytest.mark.parametrize("style,template", [("legacy", None), ("legacy", ZEPHYR_TEMPLATE),
                                            ("metaspace", None)])
def test_get_reward_queries_decoded_from_token_ids_are_split(style, template):
    """OpenRLHF decodes its queries from token ids. Llama-2's legacy tokenizer writes a word-start
    marker after every special token, which the decode turns into a space: '</s> \\n' where the
    template wrote '</s>\\n', '<s> <|user|>' for '<s><|user|>'. Such queries were refused (no
    assistant turn marker; with prompts, a query that does not start with its prompt)."""
    tok = sentencepiece_tokenizer(style)
    if template is not None:
        tok.chat_template = template
    markers = ChatMarkers.of(tok)
    prompt, response, _ = CASES[0]
    for padding in (0, 2):
        query, generation_prompt = _openrlhf_request(tok, prompt, response, padding)
        for body in ({"query": [query]}, {"query": [query], "prompts": [generation_prompt]}):
            [item] = parse_openrlhf(body, markers)
            assert (item.prompt, item.response) == (prompt, response), (body, padding)
            assert encode_critique_prefix(tok, item.prompt, item.response, PREFIX) == \
                encode_critique_prefix(tok, prompt, response, PREFIX)


# Mistral v0.3's template trims the response and not the user's text; this one the other way.
USER_TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [MISTRAL_TEMPLATE, USER_TRIMMING_TEMPLATE],
                         ids=["trims-response", "trims-user-text"])
def test_each_text_is_trimmed_as_the_template_trims_its_turn(template):
    """A template may trim one role's text and not the other's. Trimming was detected from the
    user turn and applied to every text, so under Mistral v0.3's template a response with
    whitespace around it kept it (tokens the rendered conversation does not hold), and under
    one that trims only the user's text the response lost its own. Version 3 trims each text
    as its turn is trimmed (the critique's turn is a user turn); versions 1 and 2 keep their
    rows: every text trimmed as the user's text is."""
    tok = sentencepiece_tokenizer("metaspace")
    tok.chat_template = template
    user_trimmed = template is USER_TRIMMING_TEMPLATE
    prompt, response, critique = " What is 2+2? ", "  It is 4. \n", " Right. "
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
                {"role": "user", "content": PREFIX + critique}]
    whole = _whole(tok, messages)
    ids = encode_example(tok, prompt, response, critique, "critique", PREFIX, 512).input_ids
    assert ids.tolist() == whole[:len(ids)]
    classic = encode_example(tok, prompt, response, None, "classic", PREFIX, 512).input_ids
    assert classic.tolist() == _whole(tok, messages[:2])[:len(classic)]
    prefill = encode_critique_prefix(tok, prompt, response, PREFIX)
    assert ids.tolist()[:len(prefill)] == prefill
    for version in (1, 2):
        def row(response):
            return encode_example(tok, prompt, response, critique, "critique", PREFIX, 512,
                                  version=version).input_ids.tolist()

        # The response is trimmed where the user's text is, as these versions always did.
        assert (row(response) == row(response.strip())) == user_trimmed
