"""Token for token against the reference's construction (tests/reference_cloud.py) on a
Llama-3-style tokenizer (Llama-3's pre-tokenizer regex, special tokens and Instruct chat template
over a small BPE): the scoring prefill, training rows with and without a leading space in the
critique, and the classic row. Layout version 1 is kept for models trained with it."""

import pytest
from reference_cloud import COT_PROMPT, reference_prefill_ids, reference_training_ids
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cloud_jax.data.layout import chat_layout, encode_critique_prefix, encode_example

# Llama-3's pre-tokenizer split (its tokenizer.json): letters may take one leading non-letter, so
# ":The" is one piece but ": The" is ":" + " The".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]

CASES = [  # prompt, response, critique
    ("What is 2+2?", "It is 4.", "The answer is correct and short."),
    ("Name a prime above 10.", "11 is prime.", " The response is right: 11 is prime."),
    ("  Spell cat backwards.\n", "tac", "Correct, 'tac' is cat reversed.\n"),
    ("Is the sky green?", "Yes, always.", "\nWrong: the sky is not green."),
]


@pytest.fixture(scope="module")
def tok():
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    corpus = [COT_PROMPT, "user assistant\n\n"] + [" ".join(c) for c in CASES]
    core.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    return tok


def test_the_tokenizer_merges_as_llama3_does(tok):
    # The property the layout has to respect: the separator space belongs to the next word.
    assert tok.tokenize(": The") == [":", "ĠThe"]
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [p for p, _ in pieces(":The")] == [":The"]


@pytest.mark.parametrize("prompt,response,critique", CASES)
def test_prefill_equals_the_reference(tok, prompt, response, critique):
    ours = encode_critique_prefix(tok, prompt, response, COT_PROMPT)
    assert ours == reference_prefill_ids(tok, prompt, response)
    assert tok.decode(ours).endswith("my question:")  # no lone trailing-space token
    # Version 1 prefills one token more: the prefix's trailing space on its own.
    v1 = encode_critique_prefix(tok, prompt, response, COT_PROMPT, version=1)
    assert v1[:-1] == ours and tok.convert_ids_to_tokens(v1[-1]) == "Ġ"


@pytest.mark.parametrize("prompt,response,critique", CASES)
def test_training_row_equals_the_reference(tok, prompt, response, critique):
    ex = encode_example(tok, prompt, response, critique, "critique", COT_PROMPT, 512)
    assert ex.input_ids.tolist() == reference_training_ids(tok, prompt, response, critique)
    # The prefill is a prefix of the row, and the targets are the rest: the critique and <eot>.
    prefill = encode_critique_prefix(tok, prompt, response, COT_PROMPT)
    assert ex.input_ids.tolist()[:len(prefill)] == prefill
    assert ex.target_mask.tolist() == [0] * len(prefill) + [1] * (len(ex.input_ids) - len(prefill))


def test_a_critique_without_a_leading_space_starts_with_the_joined_token(tok):
    prompt, response, critique = CASES[0]
    ex = encode_example(tok, prompt, response, critique, "critique", COT_PROMPT, 512)
    targets = tok.convert_ids_to_tokens(ex.input_ids[ex.target_mask.astype(bool)].tolist())
    assert targets[0] == "ĠThe" and targets[-1] == "<|eot_id|>"
    # Version 1 tokenizes the critique on its own: "The", after a lone "Ġ" in the prefill.
    v1 = encode_example(tok, prompt, response, critique, "critique", COT_PROMPT, 512, version=1)
    v1_targets = tok.convert_ids_to_tokens(v1.input_ids[v1.target_mask.astype(bool)].tolist())
    assert v1_targets[0] == "The"
    assert v1.input_ids.tolist() != reference_training_ids(tok, prompt, response, critique)


@pytest.mark.parametrize("prompt,response,critique", CASES)
def test_classic_row_equals_the_reference(tok, prompt, response, critique):
    ex = encode_example(tok, prompt, response, None, "classic", COT_PROMPT, 512)
    assert ex.input_ids.tolist() == reference_training_ids(tok, prompt, response)
    assert ex.input_ids.tolist()[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_a_sampled_critique_reads_back_as_the_row_it_came_from(tok):
    prompt, response, critique = CASES[0]
    ex = encode_example(tok, prompt, response, critique, "critique", COT_PROMPT, 512)
    generated = tok.decode(ex.input_ids[ex.target_mask.astype(bool)][:-1].tolist())
    assert generated == " " + critique
    text = chat_layout(tok).critique_text(generated, COT_PROMPT, 2)
    assert text == critique
    again = encode_example(tok, prompt, response, text, "critique", COT_PROMPT, 512)
    assert again.input_ids.tolist() == ex.input_ids.tolist()


@pytest.mark.parametrize("prefix", ["", "  "])
def test_a_blank_prefix_leaves_the_critique_trimmed_as_the_template_trims_it(tok, prefix):
    # The template trims the turn's whole text, prefix and critique together: with nothing in
    # the prefix, the critique's leading whitespace goes too.
    prompt, response, _ = CASES[0]
    critique = " The answer is right."
    ex = encode_example(tok, prompt, response, critique, "critique", prefix, 512)
    assert ex.input_ids.tolist() == reference_training_ids(tok, prompt, response, critique, prefix)
    prefill = encode_critique_prefix(tok, prompt, response, prefix)
    assert ex.input_ids.tolist()[:len(prefill)] == prefill
    targets = tok.convert_ids_to_tokens(ex.input_ids[ex.target_mask.astype(bool)].tolist())
    assert targets[0] == "The"


@pytest.mark.parametrize("prompt,response,critique", CASES)
def test_layout_versions_2_and_3_agree_with_the_whole_rendered_conversation(tok, prompt, response,
                                                                            critique):
    """On Llama-3 tokenizing each text with the template text before it (version 3, the default)
    changes no token: its pre-tokenizer splits where the template's text ends. The rows are the
    whole conversation as apply_chat_template(..., tokenize=True) gives it."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
                {"role": "user", "content": COT_PROMPT + critique}]
    whole = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    v2, v3 = (encode_example(tok, prompt, response, critique, "critique", COT_PROMPT, 512,
                             version=v).input_ids.tolist() for v in (2, 3))
    assert v2 == v3 == whole
    assert (encode_critique_prefix(tok, prompt, response, COT_PROMPT, version=2)
            == encode_critique_prefix(tok, prompt, response, COT_PROMPT, version=3))


def test_a_critique_merging_into_the_prefix_adds_no_character_under_any_version():
    """Llama-3's split makes ":\\n\\n" one piece, and its vocabulary one token: after a prefix
    ending in ':' (no space) a critique starting with newlines cannot start on a token of its
    own. The prefill stays a prefix of the row, and the row holds the rendered conversation's
    characters, each once (the critique is tokenized on its own after the prefill)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["Critique:\n\nWrong, it is 5.", "user assistant\n\n"] * 8,
                             trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                 show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    assert tok.tokenize("Critique:\n\nWrong") == ["Critique", ":ĊĊ", "Wrong"]
    prefix, critique = "Critique:", "\n\nWrong, it is 5."
    messages = [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Four."},
                {"role": "user", "content": prefix + critique}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    for version in (1, 2, 3):
        ex = encode_example(tok, "What?", "Four.", critique, "critique", prefix, 512,
                            version=version)
        ids = ex.input_ids.tolist()
        assert tok.decode(ids) == rendered, version
        prefill = encode_critique_prefix(tok, "What?", "Four.", prefix, version=version)
        assert ids[:len(prefill)] == prefill
        assert tok.decode(ids[len(prefill):]) == critique + "<|eot_id|>"
