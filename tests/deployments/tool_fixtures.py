"""Tool-calling test material: small chat templates with tool support, in the formats the tool-call
parsers read, put on a real tokenizer (SmolLM2's, whose own ChatML template ignores tools): Hermes
``<tool_call>`` tags, and Llama 3.1 style JSON calls (the ``ipython`` role is what ``parser_for``
recognises); and tool parameter schemas that bound every value, so that a random-weight model
forced to call a tool finishes its call within a few dozen tokens."""

from __future__ import annotations

import copy

from replica.tokenizer import Tokenizer

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TEMPLATE = """\
{%- if tools %}<|start_header_id|>system<|end_header_id|>

You may call functions. Answer with {"name": function name, "parameters": arguments}.
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{%- for tc in message.tool_calls %}
{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}
{%- endfor %}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def with_template(base: Tokenizer, template: str, name: str) -> Tokenizer:
    hf = copy.deepcopy(base.hf)
    hf.chat_template = template
    return Tokenizer(hf, eos_token_ids=base.eos_token_ids, name=name)


def hermes_tokenizer(base: Tokenizer) -> Tokenizer:
    return with_template(base, HERMES_TEMPLATE, "hermes-test")


def llama3_tokenizer(base: Tokenizer) -> Tokenizer:
    return with_template(base, LLAMA3_TEMPLATE, "llama3-test")


WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
PICK_PARAMS = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["ok", "tags"],
}
