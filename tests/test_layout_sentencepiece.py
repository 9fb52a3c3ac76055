"""Layout version 3 on SentencePiece-style tokenizers (a word-start marker ``'▁'`` in front of
every text tokenized): a row holds the tokens of the whole rendered conversation, as
``apply_chat_template(..., tokenize=True)`` gives them, where version 2 tokenized each text on its
own and gave it a marker of its own. Two small tokenizers built here: Llama-2's legacy pipeline
(a normalizer that writes the marker, under the default ChatML template a base model gets) and a
Metaspace one with Mistral-v0.3-style ``[INST]`` control tokens and template. Llama-2-chat's and
Mistral-Instruct v0.1/v0.2's templates, whose user turns end in plain ``' [/INST]'``, are refused
by name."""

import string

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cloud_jax.data.layout import encode_critique_prefix, encode_example
from cloud_jax.data.tokenizer import DEFAULT_CHAT_TEMPLATE, end_of_turn_ids
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


def _pieces(tok, version, case=CASES[0]):
    ids = encode_example(tok, *case, "critique", PREFIX, 512, version=version).input_ids
    return tok.convert_ids_to_tokens(ids.tolist())


def _follows(pieces, first):
    return [pieces[i + 1] for i, p in enumerate(pieces[:-1]) if p == first]


def test_the_marker_tokens_docs_compatibility_names():
    """docs/COMPATIBILITY.md: under Mistral-v0.3-style templates version 3 gives '[INST]',
    '▁What' where version 2 gave '[INST]', '▁', '▁What', one token more per text; under Llama-2's
    legacy tokenizer and the default template the text after the header's '\\n' starts without
    the marker in version 3, and with '▁What' in version 2."""
    tok = sentencepiece_tokenizer("metaspace")
    v2, v3 = _pieces(tok, 2), _pieces(tok, 3)
    assert v3[v3.index("[INST]"):][:2] == ["[INST]", "▁What"]
    assert v2[v2.index("[INST]"):][:3] == ["[INST]", "▁", "▁What"]
    for case in CASES:  # three texts, three markers of their own
        assert len(_pieces(tok, 2, case)) - len(_pieces(tok, 3, case)) == 3
    legacy = sentencepiece_tokenizer("legacy")
    v2, v3 = _pieces(legacy, 2), _pieces(legacy, 3)
    assert "▁What" in _follows(v2, "\n")
    assert not any(p.startswith("▁") for p in _follows(v3, "\n"))


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


def _rendered_ids(tok, prompt, response):
    """(generation prompt as rendered, its ids, the ids of the rendered conversation), tokenized
    without special tokens; the conversation's ids start with the prompt's."""
    user = {"role": "user", "content": prompt}
    generation_prompt = tok.apply_chat_template([user], tokenize=False,
                                                add_generation_prompt=True)
    conversation = tok.apply_chat_template([user, {"role": "assistant", "content": response}],
                                           tokenize=False)
    prompt_ids = tok(generation_prompt, add_special_tokens=False)["input_ids"]
    ids = tok(conversation, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    return generation_prompt, prompt_ids, ids


def _openrlhf_request(tok, prompt, response, padding):
    """(query, prompt) as OpenRLHF sends them: the generation prompt rendered as text and
    tokenized without special tokens, the policy's sample (here the tokens the rendered
    conversation has past the prompt's, then the EOS) after it, the whole decoded with
    ``skip_special_tokens=False`` (before 0.8 a batch left- and right-padded with the pad token,
    the EOS where there is none); the prompt is the rendered text itself."""
    generation_prompt, prompt_ids, ids = _rendered_ids(tok, prompt, response)
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


# The [INST] templates of the chat models whose vocabularies hold no [INST] tokens (32000 pieces,
# only <unk>, <s> and </s> special), as their tokenizer_config.json files write them: a user turn
# is '[INST] ' + text + ' [/INST]', closed by plain text. Llama-2-chat's writes a BOS before
# every user turn, puts a system message inside the first [INST] block and strips each text.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}")
MISTRAL_V02_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}{%- endif %}{%- endfor %}")


@pytest.mark.parametrize("template", [LLAMA2_CHAT_TEMPLATE, MISTRAL_V01_TEMPLATE,
                                      MISTRAL_V02_TEMPLATE],
                         ids=["llama2-chat", "mistral-v0.1", "mistral-v0.2"])
def test_inst_templates_whose_user_turns_end_in_plain_text_are_refused_by_name(template):
    """The CLoud conversation (user, assistant, user) alternates, so these templates render it;
    but the critique's user turn ends with ' [/INST]', ordinary tokens to these vocabularies
    ('▁[', '/', 'INST', ']'). A critique stops, and its reward is read, at one special token
    closing that turn, which the template does not write. The refusal (in the layout, and in
    end_of_turn_ids, which the scorer and the server start with) names the template family, why,
    and what to do, where it spoke only of <|eot_id|>, <|im_end|> and eos_token."""
    tok = sentencepiece_tokenizer("legacy")
    tok.chat_template = template
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(messages, tokenize=False).endswith("c [/INST]")
    assert len(tok.encode(" [/INST]", add_special_tokens=False)) > 1
    for call in (lambda: encode_example(tok, *CASES[0], "critique", PREFIX, 512),
                 lambda: encode_example(tok, *CASES[0][:2], None, "classic", PREFIX, 512),
                 lambda: encode_critique_prefix(tok, *CASES[0][:2], PREFIX),
                 lambda: end_of_turn_ids(tok)):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        for part in ("' [/INST]'", "Llama-2-chat", "Mistral-Instruct v0.1/v0.2",
                     "not one special token", "chat_template.jinja", "tokenizer_config.json",
                     "eos_token", "data.tokenizer"):
            assert part in message, (part, message)
    # What the message offers works: without the template, the default one (every turn closed
    # by eos_token) lays the rows out.
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    assert encode_example(tok, *CASES[0], "critique", PREFIX, 512) is not None
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_a_v0_2_template_over_a_tokenizer_with_an_inst_control_token_is_refused_as_such():
    """Mistral v0.3's tokenizer has '[/INST]' as a control token, but v0.2's template writes a
    space before it: the turn's first closing token is '▁'. The refusal says so (and not that
    '[/INST]' is ordinary text) and points at v0.3's own template."""
    tok = sentencepiece_tokenizer("metaspace")
    tok.chat_template = MISTRAL_V02_TEMPLATE
    with pytest.raises(ValueError, match=r"'\[/INST\]' is a special token to this tokenizer, "
                                         r"but the template writes text before it.*v0.3"):
        encode_example(tok, *CASES[0], "critique", PREFIX, 512)


@pytest.mark.parametrize("style,template", [("legacy", None), ("legacy", ZEPHYR_TEMPLATE),
                                            ("metaspace", MISTRAL_TEMPLATE)])
def test_get_reward_queries_whose_prompt_was_cut_from_the_left_are_split(style, template):
    """OpenRLHF 0.10+ decodes the last tokens of a prompt too long for its max_len with the
    response as the query, and sends the whole prompt. Such a query was a 422. Cut anywhere, even
    through the template's markers as Llama-2's legacy decode writes them (an EOS first, which is
    no padding here; the space the decode drops from the first token), it is split into the
    prompt's user text and the response."""
    tok = sentencepiece_tokenizer(style)
    if template is not None:
        tok.chat_template = template
    markers = ChatMarkers.of(tok)
    prompt, response, _ = CASES[0]
    generation_prompt, prompt_ids, ids = _rendered_ids(tok, prompt, response)
    for kept in range(len(prompt_ids) - 1, 0, -1):
        query = tok.decode(prompt_ids[-kept:] + ids[len(prompt_ids):] + [tok.eos_token_id],
                           skip_special_tokens=False)
        [item] = parse_openrlhf({"query": [query], "prompts": [generation_prompt]}, markers)
        assert (item.prompt, item.response) == (prompt, response), (kept, query)
