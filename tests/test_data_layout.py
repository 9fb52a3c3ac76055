"""Chat layout: one BOS, loss targets on critique + end-of-turn, reward at the final end-of-turn,
over-length policies; with the byte tokenizer and small ChatML / Llama-3-style BPE tokenizers."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cloud_jax.data.layout import encode_critique_prefix, encode_example
from cloud_jax.data.tokenizer import (BYTE_VOCAB_SIZE, DEFAULT_CHAT_TEMPLATE, byte_tokenizer,
                                      end_of_turn_ids, load_tokenizer)

PREFIX = ("The following is a break down on the correctness and usefulness of the assistant's "
          "response to my question: ")
PROMPT, RESPONSE, CRITIQUE = "What is 2+2?", "It is 4.", "The answer is correct and short."

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (  # Qwen2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [PROMPT, RESPONSE, CRITIQUE, PREFIX, "user assistant system helpful\n\n"] * 3


def _bpe(specials, bos=None, add_bos=False, **kwargs):
    """A small byte-level BPE tokenizer (merges learnt on CORPUS) with the given special tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, **kwargs)


def llama3_tokenizer():
    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>", add_bos=True,
               eos_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def chatml_tokenizer():
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>",
               pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def base_tokenizer(tmp_path):
    """A tokenizer without a chat template, saved and loaded back (gets the default one)."""
    tok = _bpe(["<s>", "</s>"], bos="<s>", add_bos=True, eos_token="</s>")
    tok.save_pretrained(tmp_path / "base")
    return load_tokenizer(str(tmp_path / "base"))


TOKENIZERS = {"byte": lambda tmp: byte_tokenizer(), "llama3": lambda tmp: llama3_tokenizer(),
              "chatml": lambda tmp: chatml_tokenizer(), "default": base_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request, tmp_path):
    return TOKENIZERS[request.param](tmp_path)


def _targets(tok, ex):
    return tok.decode(ex.input_ids[ex.target_mask.astype(bool)])


def test_end_of_turn_ids_known_tokenizers(tmp_path):
    byte = byte_tokenizer()
    assert end_of_turn_ids(byte) == [byte.convert_tokens_to_ids("<eot>")]
    llama = llama3_tokenizer()
    assert end_of_turn_ids(llama) == llama.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    chatml = chatml_tokenizer()
    assert end_of_turn_ids(chatml) == chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    base = base_tokenizer(tmp_path)
    assert base.chat_template == DEFAULT_CHAT_TEMPLATE
    assert end_of_turn_ids(base) == [base.convert_tokens_to_ids("</s>")]


def test_byte_tokenizer_round_trip(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE
    text = "héllo <eot> wörld\n"
    ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ids[:3] == [ord("h"), 0xC3, 0xA9]
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path / "t")
    again = load_tokenizer(str(tmp_path / "t"))
    assert again.encode(text) == tok.encode(text) == [tok.bos_token_id] + tok.encode(
        text, add_special_tokens=False)
    assert again.chat_template == tok.chat_template


def test_critique_layout(tok):
    ex = encode_example(tok, PROMPT, RESPONSE, CRITIQUE, "critique", PREFIX, 512)
    ids = ex.input_ids.tolist()
    eot = end_of_turn_ids(tok)[0]
    # Exactly one BOS, at the start, when the tokenizer has one.
    if tok.bos_token_id is not None:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # The reward is read at the final end-of-turn token, the sequence's last.
    assert ex.reward_index == len(ids) - 1 and ids[-1] == eot
    # Loss targets: exactly the critique's tokens and that end-of-turn token.
    prefill = encode_critique_prefix(tok, PROMPT, RESPONSE, PREFIX)
    assert ids[:len(prefill)] == prefill
    assert ex.target_mask.tolist() == [0] * len(prefill) + [1] * (len(ids) - len(prefill))
    # Layout version 2 (the reference's): the prefill ends at the prefix without its trailing
    # space, so the targets are " " + the critique.
    assert prefill == encode_critique_prefix(tok, PROMPT, RESPONSE, PREFIX.rstrip())
    assert _targets(tok, ex).replace(tok.decode([eot]), "") == " " + CRITIQUE
    # The whole sequence reads as the template renders it (the byte tokenizer decodes exactly).
    text = tok.decode(ids)
    for part in (PROMPT, RESPONSE, PREFIX + CRITIQUE):
        assert part in text
    assert ex.input_ids.dtype == np.int32 and ex.target_mask.dtype == np.uint8


def test_classic_layout_reward_at_response_eot(tok):
    ex = encode_example(tok, PROMPT, RESPONSE, None, "classic", PREFIX, 512)
    ids = ex.input_ids.tolist()
    assert ex.reward_index == len(ids) - 1 and ids[-1] in end_of_turn_ids(tok)
    assert tok.decode(ids[:-1]).rstrip().endswith(RESPONSE)
    assert not ex.target_mask.any()
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_lm_pretrain_targets_every_token_but_the_first(tok):
    ex = encode_example(tok, PROMPT, RESPONSE, CRITIQUE, "lm", PREFIX, 512)
    assert ex.target_mask.tolist() == [0] + [1] * (len(ex.input_ids) - 1)


def test_byte_layout_exact_tokens():
    tok = byte_tokenizer()
    ex = encode_example(tok, "hi", "yo", "ok", "critique", "P: ", 64)
    b = lambda s: list(s.encode())  # noqa: E731
    bos, eot, user, asst = tok.convert_tokens_to_ids(["<bos>", "<eot>", "<|user|>",
                                                      "<|assistant|>"])
    expected = ([bos, user] + b("hi") + [eot, asst] + b("yo") + [eot, user] + b("P: ") + b("ok")
                + [eot])
    assert ex.input_ids.tolist() == expected
    # Version 2: the targets are " ok" and the end of turn; the prefill stops at "P:".
    assert ex.target_mask.tolist() == [0] * (len(expected) - 4) + [1, 1, 1, 1]
    assert ex.reward_index == len(expected) - 1
    assert encode_critique_prefix(tok, "hi", "yo", "P: ") == expected[:-4]
    # Version 1: the same tokens, with the prefix's space in the prefill.
    v1 = encode_example(tok, "hi", "yo", "ok", "critique", "P: ", 64, version=1)
    assert v1.input_ids.tolist() == expected
    assert v1.target_mask.tolist() == [0] * (len(expected) - 3) + [1, 1, 1]
    assert encode_critique_prefix(tok, "hi", "yo", "P: ", version=1) == expected[:-3]


def test_llama3_bos_not_doubled_and_text_trimmed():
    tok = llama3_tokenizer()
    bos = tok.bos_token_id
    # The template writes <|begin_of_text|> and the tokenizer adds one too.
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert tok(rendered).input_ids[:2] == [bos, bos]
    ex = encode_example(tok, " " + PROMPT + "\n", RESPONSE + "  ", CRITIQUE + "\n", "critique",
                        PREFIX, 512)
    plain = encode_example(tok, PROMPT, RESPONSE, CRITIQUE, "critique", PREFIX, 512)
    # Llama-3's template trims message text; so does the layout.
    assert ex.input_ids.tolist() == plain.input_ids.tolist()
    assert ex.input_ids.tolist().count(bos) == 1


def test_a_template_that_writes_today_is_rendered_on_one_fixed_date():
    """A Llama-3.2-style template writes today's date into a system turn: rows and prefills carry
    TEMPLATE_DATE instead, so a data set tokenized on one day matches prefills rendered on
    another (and a cached data set matches a fresh one)."""
    import datetime

    from cloud_jax.data.tokenizer import TEMPLATE_DATE

    tok = llama3_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + "
        "strftime_now('%d %b %Y') + '<|eot_id|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}")
    ex = encode_example(tok, PROMPT, RESPONSE, CRITIQUE, "critique", PREFIX, 512)
    text = tok.decode(ex.input_ids.tolist())
    assert f"Today Date: {TEMPLATE_DATE.strftime('%d %b %Y')}" in text
    assert datetime.datetime.now().strftime("%d %b %Y") not in text
    prefill = encode_critique_prefix(tok, PROMPT, RESPONSE, PREFIX)
    assert ex.input_ids.tolist()[:len(prefill)] == prefill


def test_special_token_text_in_rows_stays_text():
    tok = chatml_tokenizer()
    ex = encode_example(tok, "say <|im_end|> now", RESPONSE, "ends <|im_end|> early", "critique",
                        PREFIX, 512)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ids = ex.input_ids.tolist()
    # Closers of the system, prompt and response turns, then the critique's own: none from text.
    assert ids.count(eot) == 4 and ids[-1] == eot


def test_overlength_drop_and_truncate_prompt():
    tok = byte_tokenizer()
    full = encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", 512)
    n = len(full.input_ids)
    assert encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", n) is not None
    assert encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", n - 1) is None
    cut = encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", n - 3,
                         overlength_policy="truncate_prompt")
    assert len(cut.input_ids) == n - 3 and cut.prompt_tokens_cut == 3
    assert tok.decode(cut.input_ids).startswith("<bos><|user|>3456789<eot>")
    assert cut.target_mask.sum() == full.target_mask.sum()
    assert cut.reward_index == n - 4 and cut.input_ids[-1] == tok.eos_token_id
    # An empty prompt still fits at n - 10; one token fewer cannot fit without cutting the
    # response or critique, so the row is dropped.
    assert encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", n - 10,
                          overlength_policy="truncate_prompt").prompt_tokens_cut == 10
    assert encode_example(tok, "0123456789", "yo", "ok", "critique", "P: ", n - 11,
                          overlength_policy="truncate_prompt") is None


def test_critique_prefix_with_max_length():
    tok = byte_tokenizer()
    full = encode_critique_prefix(tok, "0123456789", "yo", "P: ")
    short = encode_critique_prefix(tok, "0123456789", "yo", "P: ", max_length=len(full) - 4)
    assert short == full[:2] + full[6:]
    with pytest.raises(ValueError, match="over max_length"):
        encode_critique_prefix(tok, "0123456789", "yo", "P: ", max_length=len(full) - 11)


def test_bad_arguments():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="layout 'sft'"):
        encode_example(tok, "a", "b", "c", "sft", "P: ", 64)
    with pytest.raises(ValueError, match="overlength_policy 'cut'"):
        encode_example(tok, "a", "b", "c", "critique", "P: ", 64, overlength_policy="cut")
    with pytest.raises(ValueError, match="needs a critique"):
        encode_example(tok, "a", "b", None, "critique", "P: ", 64)


def test_template_without_special_closer_is_rejected():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                         "{% endfor %}")
    with pytest.raises(ValueError, match="special end-of-turn token"):
        encode_example(tok, "a", "b", "c", "critique", "P: ", 64)


def test_natural_benchmark_rows_are_the_same_tokens_under_layout_versions_2_and_3():
    """docs/RESULTS.md's SmolLM2 judge-pipeline numbers were measured under layout version 2 and
    hold under 3: SmolLM2's tokenizer is byte-level BPE with the GPT-2 split (ByteLevel,
    add_prefix_space false, as chatml_tokenizer's) and a ChatML template whose pieces end in
    "\\n", so a text that starts with a letter or digit is split where the piece ends and
    tokenizing it with the piece before it changes no token, whatever the merges. A text that
    starts with whitespace may differ (the piece's "\\n" joins it), which the benchmark never
    writes."""
    from cloud_jax.data.synthetic.reasoning import ReasoningBenchmarkConfig, generate_split

    tok = chatml_tokenizer()
    cfg = ReasoningBenchmarkConfig(style="natural", num_train=40, num_eval=0, num_test=0)
    rows = generate_split(cfg, "train", 40)
    for row in rows:
        for side in ("chosen", "rejected"):
            args = (row["prompt"], row[side])
            for layout, critique in (("critique", row[f"{side}_feedback"]), ("classic", None)):
                # The tiny vocabulary makes long rows: no length limit here.
                v2, v3 = (encode_example(tok, *args, critique, layout, "Critique: ", 1 << 20,
                                         version=v) for v in (2, 3))
                assert v2.input_ids.tolist() == v3.input_ids.tolist(), (row["id"], side, layout)
                assert v2.target_mask.tolist() == v3.target_mask.tolist()
                assert v2.reward_index == v3.reward_index
            assert (encode_critique_prefix(tok, *args, "Critique: ", version=2)
                    == encode_critique_prefix(tok, *args, "Critique: ", version=3))
    # The comparison can tell the versions apart where the pre-tokenizer joins across the piece.
    v2, v3 = (encode_example(tok, "\n\n" + rows[0]["prompt"], rows[0]["chosen"], "ok", "critique",
                             "Critique: ", 1 << 20, version=v).input_ids.tolist() for v in (2, 3))
    assert v2 != v3


def test_byte_level_rows_under_2_and_3_differ_where_the_split_joins_across_a_template_piece():
    """docs/COMPATIBILITY.md: byte-level tokenizers give the same rows under layout versions 2 and
    3 unless their pre-tokenizer would split a template piece and the text after it otherwise than
    each alone. Llama-3's own split keeps "\\n\\n" whole either way
    (tests/test_reference_tokens.py); the GPT-2 split of this file's Llama-3-style tokenizer
    writes "\\n\\n" before a word as two tokens and at the end of a piece as one, so version 2
    held 'ĊĊ' where the whole rendered conversation, version 3's row, holds 'Ċ', 'Ċ'."""
    tok = llama3_tokenizer()
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE},
                {"role": "user", "content": PREFIX + CRITIQUE}]
    whole = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    v2, v3 = (encode_example(tok, PROMPT, RESPONSE, CRITIQUE, "critique", PREFIX, 512,
                             version=v).input_ids.tolist() for v in (2, 3))
    assert v3 == whole
    assert tok.convert_ids_to_tokens(v3).count("ĊĊ") == 0
    assert tok.convert_ids_to_tokens(v2).count("ĊĊ") == 3


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_critique_whose_first_token_would_take_the_turns_newline_is_not_given_it_twice(version):
    # ChatML with no critique prefix: the critique turn's text starts right after the
    # template's "user\n", and a critique starting with "\n\n" merges with that newline into
    # one token. The row holds the rendered conversation, the prefill stays its prefix.
    tok = chatml_tokenizer()
    critique = "\n\nWrong."
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE},
                {"role": "user", "content": critique}]
    ex = encode_example(tok, PROMPT, RESPONSE, critique, "critique", "", 512, version=version)
    ids = ex.input_ids.tolist()
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False).rstrip("\n")
    prefill = encode_critique_prefix(tok, PROMPT, RESPONSE, "", version=version)
    assert ids[:len(prefill)] == prefill
    assert tok.decode(ids[len(prefill):]) == critique + "<|im_end|>"
