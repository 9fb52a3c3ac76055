"""A stand-in for the reference CLoud PyTorch code (``CLoudRewardModelConfig``,
``CLoudRewardModel`` and its input construction), written for these tests to behave as the real
classes do, point by point:

- the config is a ``PretrainedConfig`` with two fields, ``feedback_method`` (default "vanilla";
  only "vanilla" and "teacher" are accepted) and ``base_model_name_or_path`` (default a Llama-3-8B
  hub id), and no ``model_type``;
- the model is a ``PreTrainedModel`` whose constructor builds its backbone from
  ``AutoConfig.from_pretrained(config.base_model_name_or_path)`` (resolved against the working
  directory when it is a relative path) with random weights, then the reward head (dropout ->
  dense -> tanh -> dropout -> out_proj, dropout at the backbone's attention_dropout), and never
  calls ``post_init()``: under transformers 5 its ``from_pretrained`` then fails;
  :class:`ReferenceCLoudPatched` adds that one call, which is what a user of the reference needs;
- ``forward`` reads the reward at ``attention_mask.sum(-1) - 1`` (right padding only);
- inputs: the training row is the prompt turn, the response turn and the critique turn, each
  rendered by the chat template on its own and tokenized (a leading BOS dropped after the first),
  the critique turn's text being ``critique_prompt + critique``; the scoring prefill is the
  rendered (prompt, response) conversation followed by the critique turn rendered on its own with
  the BOS text, the EOS text and "<|eot_id|>" removed, tokenized as one text without added
  special tokens.
"""

from collections.abc import Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

COT_PROMPT = ("The following is a break down on the correctness and usefulness of the assistant's "
              "response to my question: ")


class ReferenceConfig(PretrainedConfig):
    def __init__(self, feedback_method="vanilla",
                 base_model_name_or_path="meta-llama/Meta-Llama-3-8B", **kwargs):
        if feedback_method not in ("vanilla", "teacher"):
            raise AssertionError(feedback_method)
        self.feedback_method = feedback_method
        self.base_model_name_or_path = base_model_name_or_path
        super().__init__(**kwargs)


class ReferenceHead(torch.nn.Module):
    def __init__(self, backbone_config):
        super().__init__()
        hidden = backbone_config.hidden_size
        self.dense = torch.nn.Linear(hidden, hidden)
        self.dropout = torch.nn.Dropout(backbone_config.attention_dropout)
        self.out_proj = torch.nn.Linear(hidden, 1)

    def forward(self, h):
        h = torch.tanh(self.dense(self.dropout(h)))
        return self.out_proj(self.dropout(h))


class ReferenceCLoud(PreTrainedModel):
    config_class = ReferenceConfig

    def __init__(self, config):
        super().__init__(config)
        self.feedback_method = config.feedback_method
        backbone_config = AutoConfig.from_pretrained(config.base_model_name_or_path)
        self.reward_base_model = AutoModelForCausalLM.from_config(backbone_config)
        self.reward_head = ReferenceHead(self.reward_base_model.config)
        self._no_split_modules = self.reward_base_model._no_split_modules

    def forward(self, input_ids, attention_mask):
        out = self.reward_base_model(input_ids, attention_mask, output_hidden_states=True,
                                     return_dict=True)
        rewards = self.reward_head(out.hidden_states[-1])
        last = attention_mask.sum(-1) - 1
        return rewards[torch.arange(input_ids.shape[0]), last], out.logits


class ReferenceCLoudPatched(ReferenceCLoud):
    """The reference class plus the ``post_init()`` call transformers 5 needs to load it."""

    def __init__(self, config):
        super().__init__(config)
        self.post_init()


def _ids(out):
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _turn_ids(tok, role, content, drop_bos):
    ids = _ids(tok.apply_chat_template([{"role": role, "content": content}], tokenize=True))
    if drop_bos and ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    return ids


def reference_training_ids(tok, prompt, response, critique=None, critique_prompt=COT_PROMPT):
    """The token ids of one response's training row (critique=None: the classic row)."""
    ids = _turn_ids(tok, "user", prompt, drop_bos=False)
    ids += _turn_ids(tok, "assistant", response, drop_bos=True)
    if critique is not None:
        ids += _turn_ids(tok, "user", critique_prompt + critique, drop_bos=True)
    return ids


def reference_prefill_ids(tok, prompt, response, critique_prompt=COT_PROMPT):
    """The token ids the reference prefills before generating a critique."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    turn = tok.apply_chat_template([{"role": "user", "content": critique_prompt}],
                                   tokenize=False)
    for special in (tok.decode([tok.bos_token_id]), tok.decode([tok.eos_token_id]),
                    "<|eot_id|>"):
        turn = turn.replace(special, "")
    return _ids(tok(text + turn, add_special_tokens=False))
