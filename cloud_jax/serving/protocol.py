"""The two request shapes the server takes, checked field by field, and the checks every backend
shares (settings, prefill lengths).

Native, ``POST /v1/score``::

    {"items": [{"prompt": str | [{"role": "user", "content": str | [text part, ...]}],
                "response": str}, ...],
     "num_samples": K, "temperature": T, "top_k": k, "top_p": p, "max_critique_tokens": N,
     "seed": S, "repetition_penalty": r}            # every setting optional

OpenRLHF's remote reward model, ``POST /get_reward``::

    {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [...]}

Each query is the prompt followed by the response, usually rendered with a chat template. With
``prompts``, the response is the query after its prompt, or after the end of it that the query
starts with where the client cut the prompt from the left (OpenRLHF 0.10+). Without, the query
is cut at its last assistant header (see :func:`split_query`). Either way, where the prompt part is a rendered chat
(the model's own template), the user's text is taken out of it and the response's end-of-turn is
dropped, so the model sees the conversation it was trained on. OpenRLHF decodes its queries from
token ids; where the decode does not give the rendering back (a space after each special token,
from Llama-2's legacy tokenizer), the template's markers are matched as the decode writes them.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from typing import Any, Callable, Optional, Sequence

from cloud_jax.data.schema import ContentError, content_text, lone_surrogate
from cloud_jax.serving.types import WARMUP, BackendOptions, InputTooLong, Item, Settings

# What a backend's start() scores to compile for the default settings: the shortest item.
WARMUP_ITEM = Item("", "")

_SETTING_TYPES = {"num_samples": int, "temperature": float, "top_k": int, "top_p": float,
                  "max_critique_tokens": int, "seed": int, "repetition_penalty": float}


class InvalidField(ValueError):
    """A request field is missing, of the wrong type or out of range (HTTP 422, or 400 for a body
    that is not a JSON object)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


def _text(value: str, field: str) -> str:
    """``value`` if it is Unicode text a tokenizer can take: JSON's ``\\ud800`` escapes decode to
    lone surrogates, which are not (InvalidField naming ``field``)."""
    bad = lone_surrogate(value)
    if bad is not None:
        raise InvalidField(field, bad)
    return value


def prompt_text(prompt: Any, field: str = "prompt") -> str:
    """A prompt as the text of its user turn: a string as is, or a message list holding one user
    message (the layout has one user turn before the response), its content a string or a list
    of text parts (read joined, :func:`cloud_jax.data.schema.content_text`)."""
    if isinstance(prompt, str):
        return _text(prompt, field)
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        others = [m for m in prompt if not (isinstance(m, dict) and m.get("role") == "user")]
        if len(users) == 1 and not others and isinstance(users[0].get("content"), (str, list)):
            extra = sorted(set(users[0]) - {"role", "content"})
            if extra:  # the layout has no place for it: read without it, the prompt would change
                raise InvalidField(f"{field}[0].{extra[0]}", "unknown field (a message holds "
                                                             "role and content only)")
            try:  # a list of text parts is read as their text, joined
                return _text(content_text(users[0]["content"], f"{field}[0].content"), field)
            except ContentError as err:
                raise InvalidField(err.field, err.reason) from None
        raise InvalidField(field, "a message list must hold exactly one {\"role\": \"user\", "
                                  "\"content\": str | [text parts]} message (multi-turn and "
                                  "system prompts are not supported)")
    raise InvalidField(field, f"expected a string or a message list, got {type(prompt).__name__}")


def _number(body: dict, name: str, kind: type):
    value = body[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidField(name, f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidField(name, f"expected a number, got {value!r}")
        try:
            value = float(value)  # an integer of hundreds of digits overflows
        except OverflowError:
            raise InvalidField(name, "expected a finite number, got an integer too large for "
                                     "one") from None
        if not math.isfinite(value):
            raise InvalidField(name, f"expected a finite number, got {value!r}")
    return kind(value)


def settings_from(body: dict, defaults: Settings) -> Settings:
    """The request's settings over the server's defaults; unknown keys are refused by the
    caller. A setting given as null is the server's default, but ``top_k`` / ``top_p``, where
    null is none. The two cut the distribution one at a time: a request that picks one replaces
    the server's default of the other (a server started with --top-k still takes a request's
    top_p)."""
    values = dataclasses.asdict(defaults)
    for name, kind in _SETTING_TYPES.items():
        if name in body and body[name] is not None:
            values[name] = _number(body, name, kind)
        elif name in body and name in ("top_k", "top_p"):
            values[name] = None
    for name, other in (("top_k", "top_p"), ("top_p", "top_k")):
        if body.get(name) is not None and other not in body:
            values[other] = None
    return Settings(**values)


def check_settings(settings: Settings, options: BackendOptions, classic: bool) -> None:
    """InvalidField naming the setting that no backend can serve."""
    from cloud_jax.sampling import check_repetition_penalty, method_from

    if settings.num_samples < 1:
        raise InvalidField("num_samples", f"must be >= 1, got {settings.num_samples}")
    if not 0 <= settings.max_critique_tokens <= options.max_critique_tokens:
        raise InvalidField("max_critique_tokens", f"must lie in [0, {options.max_critique_tokens}]"
                           f" (the server's --max-critique-tokens-limit), got "
                           f"{settings.max_critique_tokens}")
    if not 0 <= settings.seed < 2**32:
        raise InvalidField("seed", f"must lie in [0, 2**32), got {settings.seed}")
    for name, check in (("temperature", lambda: method_from(settings.temperature, settings.top_k,
                                                            settings.top_p)),
                        ("repetition_penalty",
                         lambda: check_repetition_penalty(settings.repetition_penalty))):
        try:
            check()
        except ValueError as err:
            field = name
            if "top_k" in str(err):
                field = "top_k"
            elif "top_p" in str(err):
                field = "top_p"
            raise InvalidField(field, str(err)) from None
    del classic  # every setting is accepted for a classic model (it samples nothing)


def check_options(options: BackendOptions, classic: bool) -> None:
    """ConfigError for backend options under which no request, or no default one, is served."""
    from cloud_jax.errors import ConfigError

    for name in ("slots", "max_queue", "max_length"):
        if getattr(options, name) < 1:
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got "
                              f"{getattr(options, name)}")
    if options.warmup not in WARMUP:
        raise ConfigError(f"warmup (--warmup) {options.warmup!r}: expected one of "
                          + ", ".join(WARMUP))
    k = options.defaults.num_samples
    if not classic and k > options.slots:
        raise ConfigError(f"the default num_samples (--num-samples) {k} needs {k} decode rows "
                          f"per item, more than slots (--slots) {options.slots}: raise --slots "
                          "or lower --num-samples")


def check_an_item_fits(rm, options: BackendOptions, classic: bool, tok=None) -> None:
    """ConfigError where not even an empty item (the chat template and critique prefix alone)
    fits ``options.max_length``, or the model's positions less the end-of-turn token: no request
    could be served, and the warm-up (an empty item) could not run."""
    from cloud_jax.errors import ConfigError

    length = item_lengths(rm, [WARMUP_ITEM], classic, options.defaults, tok)[0]
    positions = rm.config.max_position_embeddings
    room = positions if classic else positions - 1
    if length > options.max_length:
        raise ConfigError(f"max_length (--max-length) {options.max_length}: not even an empty "
                          f"item fits: it takes {length} tokens (the chat template"
                          f"{'' if classic else ' and the critique prefix'}); raise --max-length")
    if length > room:
        raise ConfigError(f"not even an empty item fits: it takes {length} tokens, more than "
                          f"the model's max_position_embeddings={positions} leave"
                          f"{'' if classic else ' after the end-of-turn token'}")


def check_request_size(items: Sequence[Item], settings: Settings, options: BackendOptions,
                       classic: bool) -> None:
    """InvalidField for a request no backend of ``options`` could ever take (a retry would not
    help): more samples per item than decode rows, more items than the queue holds."""
    if not classic and settings.num_samples > options.slots:
        raise InvalidField("num_samples", f"{settings.num_samples} samples need more decode rows "
                                          f"than the server has (--slots {options.slots})")
    if len(items) > options.max_queue:
        raise InvalidField("items", f"{len(items)} items in one request, more than the server "
                                    f"queues (--max-queue {options.max_queue}); send at most "
                                    f"{options.max_queue} per request")


def check_item_lengths(rm, items: Sequence[Item], classic: bool, settings: Settings,
                       options: BackendOptions, tok=None) -> None:
    """InputTooLong for the first item whose prefill is over ``options.max_length``, or over
    what the model's positions (max_position_embeddings) leave after the request's critique
    budget and its end-of-turn token (the whole sequence for a classic model): no item is
    read at a position the model was not built for."""
    positions = rm.config.max_position_embeddings
    room = positions if classic else positions - settings.max_critique_tokens - 1
    if room < options.max_length:
        limit = max(room, 0)
        what = (f"the model's max_position_embeddings={positions}" if classic else
                f"what the model's max_position_embeddings={positions} leaves after "
                f"max_critique_tokens={settings.max_critique_tokens} and the end-of-turn token")
    else:
        limit, what = options.max_length, "its --max-length"
    for i, length in enumerate(item_lengths(rm, items, classic, settings, tok)):
        if length > limit:
            raise InputTooLong(i, length, limit, what)


def bucket_items(rm, classic: bool, options: BackendOptions, tok=None) -> list[Item]:
    """One item per prefill length bucket that an item the server takes can fall in (from the
    shortest item's to the longest's: ``options.max_length``, or what the model's positions
    allow), each as long as its bucket allows: what ``--warmup buckets`` compiles for."""
    from cloud_jax.sampling import bucket_length

    positions = rm.config.max_position_embeddings
    longest = min(options.max_length, positions if classic else positions - 1)

    def length(n: int) -> int:
        return item_lengths(rm, [Item("a " * n, "a")], classic, options.defaults, tok)[0]

    shortest = length(0)
    out = []
    bucket = bucket_length(shortest)
    while shortest <= longest and bucket <= bucket_length(longest):
        target = min(bucket, longest)
        lo, hi = 0, 2 * target  # the most words whose item fits the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(mid) <= target else (lo, mid - 1)
        if bucket_length(length(lo)) == bucket:
            out.append(Item("a " * lo, "a"))
        bucket *= 2
    return out


def item_lengths(rm, items: Sequence[Item], classic: bool, settings: Settings,
                 tok=None) -> list[int]:
    """Each item's prefill length in tokens (the whole sequence for a classic model), tokenized
    with ``tok`` (default the model's)."""
    from cloud_jax.data.layout import encode_critique_prefix, encode_example
    from cloud_jax.scoring.rewards import (ScoreConfig, resolve_critique_prefix,
                                           resolve_layout_version)

    del settings
    tok = tok if tok is not None else rm.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; serve a checkpoint directory that holds one")
    cfg = ScoreConfig()
    prefix, version = resolve_critique_prefix(rm, cfg), resolve_layout_version(rm, cfg)
    out = []
    for i, item in enumerate(items):
        prompt = prompt_text(item.prompt, f"items[{i}].prompt")
        if classic:
            ex = encode_example(tok, prompt, item.response, None, "classic", prefix, 1 << 30,
                                version=version)
            out.append(len(ex.input_ids))
        else:
            out.append(len(encode_critique_prefix(tok, prompt, item.response, prefix,
                                                  version=version)))
    return out


def _list_of_strings(body: dict, name: str, required: bool = True) -> Optional[list]:
    """The list of strings ``body[name]`` (None where an optional one is absent); it may be empty
    (the caller checks lengths)."""
    if name not in body or body[name] is None:
        if required:
            raise InvalidField(name, "missing")
        return None
    value = body[name]
    if not isinstance(value, list):
        raise InvalidField(name, f"expected a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InvalidField(f"{name}[{i}]", f"expected a string, got {type(v).__name__}")
        _text(v, f"{name}[{i}]")
    return value


def parse_score(body: Any, defaults: Settings) -> tuple[list[Item], Settings]:
    """A ``/v1/score`` body as items and settings."""
    if not isinstance(body, dict):
        raise InvalidField("body", "expected a JSON object", status=400)
    unknown = sorted(set(body) - {"items"} - set(_SETTING_TYPES))
    if unknown:
        raise InvalidField(unknown[0], f"unknown field (known: items, "
                                       f"{', '.join(_SETTING_TYPES)})")
    if "items" not in body:
        raise InvalidField("items", "missing")
    raw = body["items"]
    if not isinstance(raw, list):
        raise InvalidField("items", f"expected a list, got {type(raw).__name__}")
    if not raw:
        raise InvalidField("items", "must not be empty")
    items = []
    for i, obj in enumerate(raw):
        if not isinstance(obj, dict):
            raise InvalidField(f"items[{i}]", "expected an object with prompt and response")
        for key in ("prompt", "response"):
            if key not in obj:
                raise InvalidField(f"items[{i}].{key}", "missing")
        if not isinstance(obj["response"], str):
            raise InvalidField(f"items[{i}].response", "expected a string")
        _text(obj["response"], f"items[{i}].response")
        prompt_text(obj["prompt"], f"items[{i}].prompt")
        extra = sorted(set(obj) - {"prompt", "response"})
        if extra:
            raise InvalidField(f"items[{i}].{extra[0]}", "unknown field")
        items.append(Item(obj["prompt"], obj["response"]))
    return items, settings_from(body, defaults)


@dataclasses.dataclass(frozen=True)
class ChatMarkers:
    """Where the model's chat template puts text: before the user's text (``user_head``, the BOS
    included), between it and the response (``assistant_head``), after the response (``tail``)."""

    user_head: str
    assistant_head: str
    tail: str
    bos: str
    # Special tokens a client may leave after the response (OpenRLHF appends the EOS), or
    # before the prompt (the left padding of a decoded batch).
    trailing: tuple = ()
    # ``user_head`` as a regular expression where the template writes today's date into it
    # (``strftime_now``, as Llama-3.2's does): a client renders the date of its own day.
    dated_head: Optional[str] = None
    # The markers as they come back from the tokenizer's decode, where that differs from the
    # rendering (see :meth:`decoded_forms`); None where the decode gives the rendering back.
    decoded: Optional["ChatMarkers"] = None
    # More forms of ``user_head``: in ``decoded``, as decoded after padding, or without the BOS.
    other_heads: tuple = ()
    # In ``decoded``: a text -> the forms its tokens decode to (see :meth:`decoded_forms`).
    decoder: Optional[Callable[[str], tuple]] = dataclasses.field(default=None, compare=False,
                                                                 repr=False)

    @classmethod
    def of(cls, tok) -> "ChatMarkers":
        def token(name):
            value = getattr(tok, name, None)
            return value if isinstance(value, str) and value else ""

        trailing = tuple(dict.fromkeys(t for t in (token("eos_token"), token("pad_token")) if t))
        bos = token("bos_token")
        (head,), middle, tail, when = _rendered_markers(tok, _SENTINELS[0], lambda t: (t,))
        raw = cls(head, middle, tail, bos, trailing,
                  _dated_pattern(head, tok.chat_template, when, bos))
        decode = _decoder(tok)

        def forms(text):  # the rendering decoded, and without its BOS (a client may drop it)
            return decode(text) + (decode(text[len(bos):]) if bos and text.startswith(bos)
                                   else ())

        for sentinels in _SENTINELS:
            # A sentinel the tokenizer cannot write back (no byte fallback: "<unk>") is useless
            # here; ASCII letters come back from any decode.
            try:
                heads, middle, tail, when = _rendered_markers(tok, sentinels, forms)
            except ValueError:
                continue
            if ((middle, tail) == (raw.assistant_head, raw.tail)
                    and set(heads) <= set(raw._heads())):
                return raw
            decoded = cls(heads[0], middle, tail, bos, trailing,
                          _dated_pattern(heads[0], tok.chat_template, when, bos),
                          other_heads=heads[1:], decoder=decode)
            return dataclasses.replace(raw, decoded=decoded)
        return raw

    def decoded_forms(self, text: str) -> tuple:
        """The forms ``text`` takes once tokenized (no special tokens added) and decoded with
        special tokens kept, as OpenRLHF writes its queries: alone, and after padding tokens
        (a decoder that drops the leading space of a decode's first token keeps it there)."""
        return self.decoder(text) if self.decoder is not None else (text,)

    def fits(self, query: str) -> bool:
        """Whether ``query`` starts with the user head and holds the assistant head after it."""
        found = self.dated_head and re.match(self.dated_head, query)
        head = next((h for h in self._heads() if h and query.startswith(h)), None)
        if head is None and not found:
            return False
        rest = query[found.end() if head is None else len(head):]
        return bool(self.assistant_head.strip()) and self.assistant_head in rest

    def _heads(self) -> tuple:
        return tuple(dict.fromkeys((self.user_head, self.user_head.removeprefix(self.bos))
                                   + self.other_heads))

    def user_text(self, prompt: str, field: str = "prompt") -> str:
        """The user's text of a rendered prompt (a plain prompt is returned unchanged).
        InvalidField naming ``field`` for a rendered chat that is not one user turn (a system
        message, several turns): the layout has no place for the rest."""
        text = prompt
        for head in self._heads():
            if head and text.startswith(head):
                text = text[len(head):]
                break
        else:
            found = self.dated_head and re.match(self.dated_head, text)
            text = text[found.end():] if found else None
        if text is not None:
            for end in (self.assistant_head, self.assistant_head.rstrip()):
                if end and text.endswith(end):
                    text = text[:-len(end)]
                    break
        marker = self.assistant_head.strip()
        if marker and marker in (prompt if text is None else text):
            raise InvalidField(field, "a rendered chat that is not one user turn (a system "
                                      "message, or several turns): the model scores one user "
                                      "message and one response; send only those")
        return prompt if text is None else text

    def unpadded(self, text: str) -> str:
        """``text`` without the EOS or padding tokens in front of it: a client that decodes a
        left-padded batch (OpenRLHF before 0.8, without packing) leaves them there."""
        while True:
            for token in self.trailing:
                if text.startswith(token):
                    text = text[len(token):]
                    break
            else:
                return text

    def response_text(self, response: str) -> str:
        """The response without the template's end of turn and the EOS (or padding) a client
        leaves after it."""
        text = response
        while True:
            for token in self.trailing:
                if text.endswith(token):
                    text = text[:-len(token)]
                    break
            else:
                break
        for end in (self.tail, self.tail.rstrip()):
            if end and text.endswith(end):
                return text[:-len(end)]
        return text


# Stand-ins for the user's text and the response: private-use characters, which any template
# writes as they are; ASCII letters where a tokenizer decodes those as "<unk>".
_SENTINELS = (("\ue001P\ue001", "\ue001R\ue001"), ("PqzxjvP", "RqzxjvR"))


def _rendered_markers(tok, sentinels: tuple, forms: Callable[[str], tuple]):
    """(the forms of the user head, the assistant head, the tail, the time of the rendering) of
    the one-turn chat rendered with ``sentinels`` as its texts, in each form ``forms`` gives the
    rendering (ValueError if a form does not hold each sentinel once, in order)."""
    p, r = sentinels
    before = datetime.datetime.now()
    text = tok.apply_chat_template([{"role": "user", "content": p},
                                    {"role": "assistant", "content": r}], tokenize=False)
    after = datetime.datetime.now()
    heads, middle, tail = [], None, None
    for form in forms(text):
        if form.count(p) != 1 or form.count(r) != 1 or form.index(p) > form.index(r):
            raise ValueError("the chat template does not write message content verbatim")
        head, rest = form.split(p)
        heads.append(head)
        if middle is None:
            middle, tail = rest.split(r)
    return tuple(dict.fromkeys(heads)), middle, tail, (before, after)


def _decoder(tok) -> Callable[[str], tuple]:
    """A text -> the forms OpenRLHF's decode gives it: its tokens (no special tokens added, as
    OpenRLHF tokenizes a prompt) decoded with ``skip_special_tokens=False`` and the tokenizer's
    other defaults, alone and after a padding token (a left-padded batch, decoded whole)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def forms(text: str) -> tuple:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        alone = tok.decode(ids, skip_special_tokens=False)
        if pad is None:
            return (alone,)
        lead = tok.decode([pad], skip_special_tokens=False)
        padded = tok.decode([pad] + ids, skip_special_tokens=False)
        return tuple(dict.fromkeys(
            (alone, padded[len(lead):] if padded.startswith(lead) else alone)))

    return forms


_DIRECTIVE = re.compile(r"%[-_0^#]?([A-Za-z%])")
# What strftime writes for a directive, as a regular expression: letters and digits for most.
_DIRECTIVE_TEXT = {"%": "%", "e": r" ?\d+", "z": r"[+-]?[\d:]*", "Z": r"[\w+-]*"}


def _date_regex(fmt: str) -> str:
    out, at = [], 0
    for m in _DIRECTIVE.finditer(fmt):
        code = m.group(1)
        out += [re.escape(fmt[at:m.start()]),
                _DIRECTIVE_TEXT.get(code, r"[\w :/.,-]+?" if code in "cxXDTFRr" else r"\w+")]
        at = m.end()
    return "".join(out) + re.escape(fmt[at:])


def _dated_pattern(head: str, template: Any, when: Sequence[datetime.datetime],
                   bos: str) -> Optional[str]:
    """``head`` as a regular expression in which each date the template wrote into it with
    ``strftime_now(format)`` (at one of the times ``when``) stands for any date of that format,
    the BOS optional; None if it holds no such date."""
    if isinstance(template, dict):
        template = "\n".join(t for t in template.values() if isinstance(t, str))
    formats = re.findall(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""",
                         template if isinstance(template, str) else "")
    rest = head.removeprefix(bos) if bos else head
    pattern = re.escape(rest)
    for fmt in dict.fromkeys(f for _, f in formats):
        for date in dict.fromkeys(t.strftime(fmt) for t in when):
            if date and date in rest:
                pattern = pattern.replace(re.escape(date), _date_regex(fmt))
    if pattern == re.escape(rest):
        return None
    return (f"(?:{re.escape(bos)})?" if rest != head else "") + pattern


def split_query(query: str, prompt: Optional[str], markers: ChatMarkers,
                field: str) -> tuple[str, str]:
    """(user text, response text) of one OpenRLHF query.

    OpenRLHF decodes its queries from token ids, and sends the prompts as rendered: where the
    tokenizer's decode does not give the rendering back (Llama-2's legacy tokenizer writes a
    space after a special token: ``'</s> \\n'`` for the template's ``'</s>\\n'``), the query is
    split at the markers in their decoded form (``markers.decoded``), after its prompt decoded
    likewise. A query that starts with an end of its prompt, not the whole of it, had its prompt cut
    from the left (see :func:`_after_cut_prompt`)."""
    sent, query = query, markers.unpadded(query)
    decoded = markers.decoded
    if prompt is not None:
        prompt = markers.unpadded(prompt)
        forms = [(prompt, markers)] + ([(f, decoded) for f in decoded.decoded_forms(prompt)]
                                       if decoded is not None else [])
        whole = next(((f, m) for f, m in forms if query.startswith(f)), None)
        if whole is not None:
            prompt, markers = whole
            response = query[len(prompt):]
        else:
            prompt, markers, response = _after_cut_prompt((sent, query), forms, field)
        head = prompt
        # A generation prompt may end short of the text the template writes before a response
        # (Mistral's ends at "[/INST]" and its assistant turn starts " " + response): that text
        # is the template's, not the response's.
        ahead = markers.assistant_head
        for k in range(len(ahead) - 1 if not head.endswith(ahead) else 0, 0, -1):
            if head.endswith(ahead[:k]) and response.startswith(ahead[k:]):
                head, response = head + ahead[k:], response[len(ahead) - k:]
                break
    else:
        if decoded is not None and not markers.fits(query) and decoded.fits(query):
            markers = decoded
        cut = query.rfind(markers.assistant_head) if markers.assistant_head.strip() else -1
        if cut < 0:
            raise InvalidField(field, f"no assistant turn marker {markers.assistant_head!r} of "
                                      "the model's chat template found; send prompts too")
        head = query[:cut + len(markers.assistant_head)]
        response = query[cut + len(markers.assistant_head):]
    return markers.user_text(head, field), markers.response_text(response)


def _kept_end(prompt: str, query: str) -> int:
    """The length of the longest end of ``prompt`` that ``query`` starts with (the prefix
    function of ``query``'s head, a separator and ``prompt``: linear in their lengths)."""
    seq = list(query[:len(prompt)]) + [None] + list(prompt)
    border = [0] * len(seq)
    for i in range(1, len(seq)):
        k = border[i - 1]
        while k and seq[i] != seq[k]:
            k = border[k - 1]
        border[i] = k + (seq[i] == seq[k])
    return border[-1]


def _after_cut_prompt(queries: tuple, forms: list, field: str) -> tuple:
    """(prompt, its markers, the response) of a query whose prompt was cut from the left: OpenRLHF
    (0.10 and later) keeps the last tokens of a prompt too long for its ``max_len``, decodes them
    with the response's as the query, and sends the whole prompt in ``prompts``. Such a query
    starts with an end of the prompt (after the U+FFFD a cut through a character's bytes decodes
    to; short of a space the decode drops from its first token), the response after it. Of
    ``forms`` (the prompt as rendered and as decoded, each with its markers) and ``queries`` (the
    query as sent, and without the padding tokens in front of it: an EOS there may be the cut
    prompt's, not padding), the pair with the longest such end is taken, a decoded form over the
    rendering where they keep as much (such a query is a decode); InvalidField naming ``field``
    for a query that starts with no end of its prompt."""
    kept, form, markers, query, skip = 0, None, None, None, 0
    for sent in queries:
        rest = sent.lstrip("\ufffd")
        for f, m in forms:
            k = _kept_end(f, rest)
            if k and k >= kept:  # the later forms are the decoded ones
                kept, form, markers, query, skip = k, f, m, sent, len(sent) - len(rest)
    if not kept:
        raise InvalidField(field, "does not start with its prompt (prompts[i]), nor with an end "
                                  "of it (what a client that cuts a long prompt from the left "
                                  "keeps); the query must be the prompt, or an end of it, "
                                  "followed by the response")
    return form, markers, query[skip + kept:]


def parse_openrlhf(body: Any, markers: ChatMarkers) -> list[Item]:
    """A ``/get_reward`` body as items; ``labels`` are accepted and unused, and so are fields
    this endpoint does not know (OpenRLHF versions add some), but for ``/v1/score``'s settings:
    this endpoint scores with the server's defaults, so a setting sent here would be ignored.
    An empty ``query`` list is no items: OpenRLHF cuts a batch over its reward servers in
    ceil(n / servers) chunks, so a server past the queries gets an empty one."""
    if not isinstance(body, dict):
        raise InvalidField("body", "expected a JSON object", status=400)
    for name in _SETTING_TYPES:
        if name in body:
            raise InvalidField(name, "/get_reward scores with the server's default settings (the "
                                     f"serve command's --{name.replace('_', '-')} and the other "
                                     "sampling flags) and takes none per request; send settings "
                                     "of your own to /v1/score")
    queries = _list_of_strings(body, "query")
    prompts = _list_of_strings(body, "prompts", required=False)
    if prompts is not None and len(prompts) != len(queries):
        raise InvalidField("prompts", f"{len(prompts)} prompts for {len(queries)} queries: give "
                                      "one per query, or none")
    labels = body.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(queries)):
        raise InvalidField("labels", f"expected a list of {len(queries)} entries (one per query)")
    items = []
    for i, query in enumerate(queries):
        user, response = split_query(query, None if prompts is None else prompts[i], markers,
                                     f"query[{i}]")
        items.append(Item(user, response))
    return items
