"""Chat layout of one scored sequence, tokenized, with its loss targets and reward position.

Critique layout (``layout="critique"``: stages critique_sft and cloud; ``"lm"``, with a target
at every token: lm_pretrain):

    [user: PROMPT] [assistant: RESPONSE] [user: CRITIQUE_PREFIX + CRITIQUE]<end-of-turn>

Classic layout (``layout="classic"``: stage classic): ``[user: PROMPT] [assistant: RESPONSE]<end-of-turn>``. The reward
is read at the final end-of-turn token, recorded as ``reward_index``; the sequence ends there.

The chat template is rendered once per tokenizer with a sentinel in place of every message's text,
and cut at the sentinels into fixed template pieces. A sequence is the template pieces' tokens
with the tokens of each text in between, each text tokenized with the template piece before it
(from layout version 3) or on its own (up to 2), so:
- the prefill the sampler uses (``encode_critique_prefix``) is exactly a prefix of the training
  sequence, whatever the tokenizer would merge across the boundary;
- special-token strings inside row text (say a literal "<|eot_id|>" in a prompt) stay plain text
  and cannot end a turn early;
- the prompt's tokens are known, so ``truncate_prompt`` can cut them from the left.
Templates that trim message text (Llama-3's does) are detected and the texts trimmed likewise:
from version 3 each text as the template trims its own turn (Mistral v0.3's trims the response and
not the user's text; the critique's turn is a user turn), up to 2 every text as the user's text.
There is exactly one BOS: the one the template writes, or else the one the tokenizer would add.

Three layout versions (``data.config.LAYOUT_VERSIONS``):
- 3 (default): a text and the template piece before it are tokenized as one text and cut where
  the text begins (a token holding any of the text's characters is the text's), so the row holds
  the tokens of the whole rendered conversation (``apply_chat_template(..., tokenize=True)``).
  A SentencePiece tokenizer (Llama-2, Mistral) writes a word-start marker at the start of every
  text it tokenizes: on its own, a text after ``'[INST] '`` would start ``'▁', '▁What'``, and
  ``'\nWhat'`` would become ``'\n', '▁What'``; in context it is ``'▁What'`` and ``'What'``, as
  the model saw in chat tuning and as other tools render it. A text holding an added token's
  string is tokenized on its own. A template that trims one role's text and not the other's
  has each text trimmed as its own turn is. The critique turn is built as in 2. For byte-level BPE
  tokenizers whose pre-tokenizer splits at the template's boundaries (Llama-3, Qwen2) the tokens
  are those of version 2.
- 2, the reference's: each text tokenized on its own; the critique turn's text is
  ``CRITIQUE_PREFIX + CRITIQUE`` (trimmed as a whole where the template trims), tokenized as one
  text; the prefill ends at the prefix without its trailing whitespace, so the critique's first
  token carries the separating space (``'ĠThe'``), as in the reference's rows. Should the
  tokenizer merge across the end of the prefix (a prefix that ends in a letter-joining
  character), the critique is tokenized on its own after it instead, so the prefill is always a
  prefix of the training sequence. Checkpoints the reference wrote are scored this way.
- 1: as 2, but the prefix (with its trailing space) and the critique tokenized on their own.
  Models exported before the version was recorded were trained this way and are scored this way.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import List, Optional

import numpy as np
from transformers import PreTrainedTokenizerBase

from cloud_jax.data.config import (CRITIQUE_PREFIX, LAYOUT_VERSION, LAYOUT_VERSIONS, LAYOUTS,
                                   OVERLENGTH_POLICIES)
from cloud_jax.data.tokenizer import render_around, render_chat, turn_closer_after

_PROMPT, _RESPONSE, _CRITIQUE = "\ue001P\ue001", "\ue001R\ue001", "\ue001C\ue001"


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # [L] int32
    # [L] uint8: 1 where the token is a loss target, i.e. is predicted from position t-1.
    target_mask: np.ndarray
    # Position of the end-of-turn token the reward is read at (always L-1).
    reward_index: int
    # Prompt tokens cut from the left by the truncate_prompt policy.
    prompt_tokens_cut: int = 0


def _split(text: str, *sentinels: str) -> List[str]:
    pieces = []
    for s in sentinels:
        if text.count(s) != 1:
            raise ValueError("the chat template does not write message content verbatim; it "
                             "cannot be used for the critique layout")
        head, text = text.split(s)
        pieces.append(head)
    return pieces + [text]


class ChatLayout:
    """Template pieces of one tokenizer, tokenized once; encodes rows in either layout."""

    def __init__(self, tok: PreTrainedTokenizerBase):
        self.tok = tok
        self.chat_template = tok.chat_template
        # Sentinels hide whether the template trims message text (Llama-3's does); render real
        # padded text once a role to find out, so the texts can be trimmed the same way. Mistral
        # v0.3's trims the response and not the user's text: each role is probed (the critique's
        # turn is a user turn). Up to version 2 every text is trimmed as the user's text is.
        probe = [{"role": "user", "content": " x "}, {"role": "assistant", "content": " y "}]

        def trims(turn: int) -> bool:
            before, after = render_around(tok, probe[:turn + 1], turn)
            return render_chat(tok, probe[:turn + 1]) != before + probe[turn]["content"] + after

        self.trims, self.trims_response = trims(0), trims(1)
        critique_msgs = [{"role": "user", "content": _PROMPT},
                         {"role": "assistant", "content": _RESPONSE},
                         {"role": "user", "content": _CRITIQUE}]
        text = render_chat(tok, critique_msgs)
        head, mid1, mid2, tail = _split(text, _PROMPT, _RESPONSE, _CRITIQUE)
        self.critique_texts = (head, mid1, mid2)
        self.critique_closer = turn_closer_after(tok, tail, "the critique's user turn")
        text = render_chat(tok, critique_msgs[:2])
        head, mid1, tail = _split(text, _PROMPT, _RESPONSE)
        self.classic_texts = (head, mid1)
        self.classic_closer = turn_closer_after(tok, tail, "the response's assistant turn")
        bos = tok.bos_token_id
        # Template text is tokenized without added special tokens, so the only BOS so far is the
        # one the template writes (Llama-3: <|begin_of_text|>); add the tokenizer's if it has none.
        self.bos = bos if (bos is not None
                           and tok.encode("a", add_special_tokens=True)[:1] == [bos]) else None
        # Strings the tokenizer reads as one added token wherever they stand in a text.
        self.added = tuple(t.content for t in getattr(tok, "added_tokens_decoder", {}).values()
                           if t.content)
        self._ids_of_piece: dict = {}

    def _template_ids(self, text: str) -> List[int]:
        ids = self._ids_of_piece.get(text)
        if ids is None:
            ids = self._ids_of_piece[text] = (
                self.tok.encode(text, add_special_tokens=False) if text else [])
        return ids

    def _text_ids(self, text: str) -> List[int]:
        # Row text never yields special tokens: "<|eot_id|>" written in a prompt stays characters.
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _piece_and_text(self, piece: str, text: str, version: int) -> tuple[List[int], List[int]]:
        """(tokens of the template piece ``piece``, tokens of the row ``text`` written after it).

        Up to version 2 each is tokenized on its own. From version 3 they are tokenized as one
        text, as the rendered conversation would be, and cut where the text begins: a token that
        holds any of the text's characters is the text's (a SentencePiece tokenizer's ``'▁What'``
        after ``'[INST] '``), so a text gets no word-start marker the whole rendering would not
        give it. A text holding the string of an added token (say ``"<|eot_id|>"``) is tokenized
        on its own, so it stays characters.
        """
        if version < 3 or not text or any(s in text for s in self.added):
            return self._template_ids(piece), self._text_ids(text)
        if not getattr(self.tok, "is_fast", False):
            # A Python tokenizer gives no character offsets: the piece's tokens are those that
            # the joint text and the piece alone share from the start (a token that spans the
            # boundary differs, so it is the text's, as with offsets).
            ids = self.tok.encode(piece + text, add_special_tokens=False)
            own = self._template_ids(piece)
            cut = 0
            while cut < min(len(ids), len(own)) and ids[cut] == own[cut]:
                cut += 1
            return ids[:cut], ids[cut:]
        enc = self.tok(piece + text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        cut = next((i for i, (_, end) in enumerate(offsets) if end > len(piece)), len(ids))
        return ids[:cut], ids[cut:]

    def _first(self, ids: List[int]) -> List[int]:
        """The row's first tokens with the tokenizer's BOS in front where the template writes
        none."""
        return [self.bos] + ids if self.bos is not None and ids[:1] != [self.bos] else ids

    def _texts(self, prompt: str, response: str, critique_prefix: str, version: int):
        """The texts trimmed as the template trims them: from version 3 the response as the
        assistant's turn is, up to 2 as the user's."""
        trims_response = self.trims_response if version >= 3 else self.trims
        if trims_response:
            response = response.strip()
        if self.trims:
            return prompt.strip(), response, critique_prefix.lstrip()
        return prompt, response, critique_prefix

    def _prefill_text(self, critique_prefix: str, version: int) -> str:
        """The part of the critique turn the sampler prefills (``critique_prefix`` as _texts
        leaves it)."""
        _check_version(version)
        return critique_prefix.rstrip() if version >= 2 else critique_prefix

    def _prefill_ids(self, critique_prefix: str, version: int) -> List[int]:
        """Tokens of the critique turn up to the end of its prefill: the template's text before
        the turn's text, then the part of the prefix the sampler prefills."""
        mid2, head = self._piece_and_text(self.critique_texts[2],
                                          self._prefill_text(critique_prefix, version), version)
        return mid2 + head

    def _critique_ids(self, critique_prefix: str, critique: str,
                      version: int) -> tuple[List[int], List[int]]:
        """(prefill, target) tokens of the critique turn: the turn's opening and its text up to
        the end of the prefill, then the critique."""
        prefill = self._prefill_ids(critique_prefix, version)
        head_text = self._prefill_text(critique_prefix, version)
        if version < 2:
            return prefill, self._text_ids(critique.rstrip() if self.trims else critique)
        full = critique_prefix + critique
        if self.trims:
            # Both ends: a blank prefix (lstripped to "") leaves the critique's own start.
            full = full.strip()
        joint = sum(self._piece_and_text(self.critique_texts[2], full, version), [])
        if joint[:len(prefill)] == prefill:
            return prefill, joint[len(prefill):]
        # The tokenizer merges across the end of the prefix: keep the prefill a prefix.
        rest = full[len(head_text):]
        if version >= 3:
            # The critique in context where the tokens before it are the prefill's; where a
            # token spans the end of the prefill (":\n\n" after "...:"), the critique's share of
            # it would hold characters the prefill already has: tokenize it on its own instead.
            before, in_context = self._piece_and_text(self.critique_texts[2] + head_text, rest,
                                                      version)
            if before == prefill:
                return prefill, in_context
        return prefill, self._text_ids(rest)

    def critique_text(self, generated: str, critique_prefix: str, version: int) -> str:
        """A sampled critique as text the training rows take back: from version 2 the separator
        the prefill left off (the prefix's trailing whitespace) is removed from its start."""
        if self._prefill_text(critique_prefix, version) == critique_prefix:
            return generated
        sep = critique_prefix[len(critique_prefix.rstrip()):]
        text = generated[len(sep):] if generated.startswith(sep) else generated
        return text.rstrip() if self.trims else text

    def critique_prefix_ids(self, prompt: str, response: str, critique_prefix: str,
                            max_length: Optional[int] = None,
                            version: int = LAYOUT_VERSION, min_prompt_cut: int = 0) -> List[int]:
        prompt, response, critique_prefix = self._texts(prompt, response, critique_prefix,
                                                        version)
        head, prompt_ids = self._piece_and_text(self.critique_texts[0], prompt, version)
        head = self._first(head)
        rest = (sum(self._piece_and_text(self.critique_texts[1], response, version), [])
                + self._prefill_ids(critique_prefix, version))
        cut = min(max(min_prompt_cut, 0), len(prompt_ids))
        if max_length is not None:
            excess = len(head) + len(prompt_ids) + len(rest) - max_length
            if excess > len(prompt_ids):
                raise ValueError(f"the critique prefill is {excess - len(prompt_ids)} tokens "
                                 f"over max_length={max_length} even with the prompt cut away")
            cut = max(cut, excess)
        return head + prompt_ids[cut:] + rest

    def encode(self, prompt: str, response: str, critique: Optional[str], layout: str,
               critique_prefix: str, max_length: int,
               overlength_policy: str = "drop",
               version: int = LAYOUT_VERSION, min_prompt_cut: int = 0) -> Optional[Example]:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if overlength_policy not in OVERLENGTH_POLICIES:
            raise ValueError(f"overlength_policy {overlength_policy!r}: expected one of "
                             f"{', '.join(OVERLENGTH_POLICIES)}")
        _check_version(version)
        prompt, response, critique_prefix = self._texts(prompt, response, critique_prefix,
                                                        version)
        if layout == "classic":
            texts = self.classic_texts
            middle = (sum(self._piece_and_text(texts[1], response, version), [])
                      + [self.classic_closer])
            num_targets = 0
        else:
            if not critique:
                raise ValueError(f"the {layout} layout needs a critique for every response")
            texts = self.critique_texts
            prefill, critique_ids = self._critique_ids(critique_prefix, critique, version)
            targets = critique_ids + [self.critique_closer]
            middle = (sum(self._piece_and_text(texts[1], response, version), [])
                      + prefill + targets)
            num_targets = len(targets)
        head, prompt_ids = self._piece_and_text(texts[0], prompt, version)
        head = self._first(head)
        excess = len(head) + len(prompt_ids) + len(middle) - max_length
        cut = 0
        if excess > 0:
            if overlength_policy == "drop" or excess > len(prompt_ids):
                return None
            cut = excess
        if overlength_policy == "truncate_prompt":
            cut = max(cut, min(min_prompt_cut, len(prompt_ids)))
        ids = np.asarray(head + prompt_ids[cut:] + middle, np.int32)
        mask = np.zeros(len(ids), np.uint8)
        if layout == "lm":
            mask[1:] = 1
        elif num_targets:
            mask[len(ids) - num_targets:] = 1
        return Example(input_ids=ids, target_mask=mask, reward_index=len(ids) - 1,
                       prompt_tokens_cut=cut)


def _check_version(version: int) -> None:
    if version not in LAYOUT_VERSIONS:
        raise ValueError(f"layout version {version!r}: expected one of "
                         f"{', '.join(map(str, LAYOUT_VERSIONS))}")


_layouts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_layout(tok: PreTrainedTokenizerBase) -> ChatLayout:
    """The ChatLayout of ``tok``, built once per tokenizer (and again if its template changes)."""
    layout = _layouts.get(tok)
    if layout is None or layout.chat_template != tok.chat_template:
        layout = _layouts[tok] = ChatLayout(tok)
    return layout


def encode_critique_prefix(tok: PreTrainedTokenizerBase, prompt: str, response: str,
                           critique_prefix: str = CRITIQUE_PREFIX,
                           max_length: Optional[int] = None,
                           version: int = LAYOUT_VERSION, min_prompt_cut: int = 0) -> List[int]:
    """Tokens up to and including the critique prefix: what the sampler prefills before writing
    a critique. With ``max_length``, prompt tokens are cut from the left to fit (ValueError if
    even an empty prompt does not). ``min_prompt_cut``: prompt tokens cut from the left however
    short the input (at most the whole prompt), so that two responses to one prompt read the
    same prompt tokens."""
    return chat_layout(tok).critique_prefix_ids(prompt, response, critique_prefix, max_length,
                                                version, min_prompt_cut)


def encode_example(tok: PreTrainedTokenizerBase, prompt: str, response: str,
                   critique: Optional[str], layout: str,
                   critique_prefix: str = CRITIQUE_PREFIX, max_length: int = 2048,
                   overlength_policy: str = "drop",
                   version: int = LAYOUT_VERSION, min_prompt_cut: int = 0) -> Optional[Example]:
    """One response in ``layout`` (one of :data:`cloud_jax.data.config.LAYOUTS`); None when it is
    over ``max_length`` and the policy drops it. Under ``truncate_prompt``, ``min_prompt_cut``
    prompt tokens (at most the whole prompt) are cut from the left however short the row.

    Loss targets: the critique and its end-of-turn token ("critique"); every token after the first
    ("lm"); none ("classic"). ``critique`` is unused by "classic".
    """
    return chat_layout(tok).encode(prompt, response, critique, layout, critique_prefix,
                                   max_length, overlength_policy, version, min_prompt_cut)
