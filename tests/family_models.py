"""Tiny models of each causal family strop is used with, each with a tiny tokenizer that carries the
family's real chat template (the official Jinja, written out below), its special tokens and its
bos/eos settings, so tests see what a user's tokenizer_config.json gives strop.

`build_tokenizer(family)`, `build_model(family, vocab_size)` and `save(family, folder)` (a Hugging
Face folder, the path users load) are reused by any test that walks the family matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# ------------------------------------------------------------------ official chat templates

# meta-llama/Llama-3.1-8B-Instruct (= 3.3-70B-Instruct): a system header with the knowledge cut-off
# and a fixed date is always written; contents are trimmed.
LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct: a default system prompt when the conversation has none.
QWEN2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B: replies after the last user turn carry a <think> block (empty when there is no
# reasoning); replies before it are rendered without their reasoning.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# google/gemma-2-2b-it: no system role (the template raises), the assistant is "model".
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-4b-it (text): a system message is folded into the first user turn.
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.1: no system role, no generation prompt (a reply follows [/INST]).
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.3 (the v3 template, tool branches inert without tools): [INST] and
# [/INST] are control tokens; the system message goes into the *last* user turn, so a conversation's
# earlier turns render without it; a reply is " " + content|trim + eos; no generation prompt.
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# microsoft/Phi-3.5-mini-instruct: turns end in <|end|>; the EOS closes a conversation, not a turn.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# allenai/OLMo-2-1124-7B-Instruct (Tülu 3): role headers are plain text, a reply ends in the EOS.
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """One family: its model type, config arguments, template and tokenizer settings."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)  # beyond the shared tiny sizes
    template: str | None = None  # None: the tokenizer has none (strop's 'auto' falls back to ChatML)
    specials: tuple[str, ...] = ()  # special tokens in the vocabulary
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen 3's <think>)
    bos: str | None = None
    eos: str = "<|endoftext|>"
    pad: str | None = None
    unk: str | None = None
    adds_bos: bool = False  # the tokenizer prepends bos when asked for special tokens
    end_of_turn: str = ""  # the token a reply ends with (what generation stops at)
    system: str = (
        "native"  # native | folded (into the first user turn) | last (into the last) | refused (raises)
    )


FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "llama",
            dict(tie_word_embeddings=False),
            LLAMA3,
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
            + ("<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",  # the base tokenizer's, as Llama-3-8B-Instruct first shipped: not <|eot_id|>
            adds_bos=True,
            end_of_turn="<|eot_id|>",
        ),
        Family(
            "qwen2.5",
            "qwen2",
            dict(tie_word_embeddings=True),
            QWEN2_5,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            end_of_turn="<|im_end|>",
        ),
        Family(
            "qwen3",
            "qwen3",
            dict(head_dim=8, tie_word_embeddings=True),
            QWEN3,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
            plain=("<think>", "</think>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            end_of_turn="<|im_end|>",
        ),
        Family(
            "gemma2",
            "gemma2",
            dict(head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
            GEMMA2,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            end_of_turn="<end_of_turn>",
            system="refused",
        ),
        Family(
            "gemma3",
            "gemma3_text",
            dict(head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
            GEMMA3,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            end_of_turn="<end_of_turn>",
            system="folded",
        ),
        Family(
            "mistral",
            "mistral",
            dict(sliding_window=16),
            MISTRAL,
            ("<unk>", "<s>", "</s>"),
            bos="<s>",
            eos="</s>",
            unk="<unk>",
            adds_bos=True,
            end_of_turn="</s>",
            system="refused",
        ),
        Family(
            "mistral_v0.3",
            "mistral",
            {},  # v0.3 has no sliding window
            MISTRAL_V3,
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]")
            + ("[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
            bos="<s>",
            eos="</s>",
            unk="<unk>",
            adds_bos=True,
            end_of_turn="</s>",
            system="last",
        ),
        Family(
            "phi3",
            "phi3",
            {},
            PHI3,
            ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<unk>",
            end_of_turn="<|end|>",
        ),
        Family(
            "olmo2",
            "olmo2",
            {},
            OLMO2,
            ("<|endoftext|>", "<|pad|>"),
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|pad|>",
            end_of_turn="<|endoftext|>",
        ),
        Family("gpt2", "gpt2", {}, None, ("<|endoftext|>",), bos="<|endoftext|>", unk="<|endoftext|>"),
        Family(
            "gpt_neox", "gpt_neox", {}, None, ("<|endoftext|>",), bos="<|endoftext|>", unk="<|endoftext|>"
        ),
    ]
}
CHAT_FAMILIES = [f for f in FAMILIES.values() if f.template]

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Arr! Seven times eight be 56, matey. Yo ho ho!",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Explain why the sky is blue. Be a pirate. Think it through first.",
    "system user assistant model Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "[INST] question [/INST] answer <|user|>\n<|assistant|>\n<|system|>\n",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ! ? : ; ' \" # @",
]


def build_tokenizer(family: Family):
    """A byte-level BPE trained on a few lines, with the family's special tokens, template and bos/eos."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    if family.plain:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    if family.adds_bos:
        bos = (family.bos, tk.token_to_id(family.bos))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        clean_up_tokenization_spaces=False,
    )
    if family.template:
        tok.chat_template = family.template
    return tok


def build_model(family: Family, tokenizer, seed: int = 0):
    """A tiny random model of the family's model type, its special ids those of `tokenizer`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    sizes = dict(TINY)
    if family.model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, n_positions=512)
    elif family.model_type == "gpt_neox":
        sizes.pop("num_key_value_heads")
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tokenizer), **{**sizes, **ids, **family.config}
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save(family: Family, folder: Path) -> Path:
    """The family's tiny model and tokenizer as a Hugging Face folder (what users load)."""
    if not (folder / "config.json").exists():
        tok = build_tokenizer(family)
        build_model(family, tok).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ Qwen 3 MoE

# Qwen/Qwen3-30B-A3B: Qwen 3's tokenizer and template over a sparse mixture-of-experts MLP (in
# transformers 5 the experts are fused 3-D parameters, not nn.Linear layers). Kept out of FAMILIES,
# whose template tests are written for the dense families' names; the matrix beyond templates walks
# CAUSAL_FAMILIES.
QWEN3_MOE = Family(
    "qwen3_moe",
    "qwen3_moe",
    dict(
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ),
    QWEN3,
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
    plain=("<think>", "</think>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    end_of_turn="<|im_end|>",
)
CAUSAL_FAMILIES = {**FAMILIES, QWEN3_MOE.name: QWEN3_MOE}


# ------------------------------------------------------------------ encoders (classification, reward)


@dataclass(frozen=True)
class Encoder:
    """An encoder family: its model type, config arguments, and its tokenizer's kind and specials."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    kind: str = "wordpiece"  # wordpiece ([CLS] a [SEP]) | bpe (byte-level, <s> a </s>)
    cls: str = "[CLS]"
    sep: str = "[SEP]"
    pad: str = "[PAD]"
    unk: str = "[UNK]"
    mask: str = "[MASK]"


ENCODERS = {
    e.name: e
    for e in [
        Encoder("bert", "bert"),
        Encoder(
            "roberta", "roberta", kind="bpe", cls="<s>", sep="</s>", pad="<pad>", unk="<unk>", mask="<mask>"
        ),
        Encoder("deberta-v2", "deberta-v2", dict(relative_attention=True, pos_att_type=["p2c", "c2p"])),
        Encoder(
            "modernbert", "modernbert", dict(global_attn_every_n_layers=2, local_attention=16), kind="bpe"
        ),
    ]
}


def build_encoder_tokenizer(encoder: Encoder):
    """A WordPiece (BERT, DeBERTa-v2) or byte-level BPE (RoBERTa, ModernBERT) tokenizer trained on a few
    lines, wrapping each text as the family does: CLS text SEP (pairs: CLS a SEP b SEP)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [encoder.pad, encoder.unk, encoder.cls, encoder.sep, encoder.mask]
    if encoder.kind == "wordpiece":
        # the vocabulary by hand, not WordPieceTrainer: its ties fall differently from run to run
        normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        words = sorted(
            {w for line in CORPUS for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))}
        )
        chars = sorted({c for w in words for c in w})
        pieces = specials + chars + [f"##{c}" for c in chars] + [w for w in words if len(w) > 1]
        tk = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token=encoder.unk))
        tk.normalizer, tk.pre_tokenizer, tk.decoder = normalizer, splitter, decoders.WordPiece()
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tk.train_from_iterator(CORPUS, trainer)
    cls, sep = (encoder.cls, tk.token_to_id(encoder.cls)), (encoder.sep, tk.token_to_id(encoder.sep))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{cls[0]} $A {sep[0]}",
        pair=f"{cls[0]} $A {sep[0]} $B:1 {sep[0]}:1",
        special_tokens=[cls, sep],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        cls_token=encoder.cls,
        sep_token=encoder.sep,
        pad_token=encoder.pad,
        unk_token=encoder.unk,
        mask_token=encoder.mask,
        clean_up_tokenization_spaces=False,
    )


def build_encoder(encoder: Encoder, tokenizer, seed: int = 0):
    """A tiny random bare encoder (AutoModel, no task head) of the family, dropout off."""
    import torch
    from transformers import AutoConfig, AutoModel

    sizes = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    if encoder.model_type == "modernbert":
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
        drop = dict(attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0)
    else:
        drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = AutoConfig.for_model(
        encoder.model_type, vocab_size=len(tokenizer), **sizes, **ids, **drop, **encoder.config
    )
    torch.manual_seed(seed)
    return AutoModel.from_config(config, dtype=torch.float32)


def save_encoder(encoder: Encoder, folder: Path) -> Path:
    """The encoder's tiny model and tokenizer as a Hugging Face folder."""
    if not (folder / "config.json").exists():
        tok = build_encoder_tokenizer(encoder)
        build_encoder(encoder, tok).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder
