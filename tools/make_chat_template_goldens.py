#!/usr/bin/env python3
"""Golden chat-template renderings (tests/fixtures/chat_template_golden.json).

    /work/venv/bin/python tools/make_chat_template_goldens.py     # transformers 5.25.0 was used

Renders a few templates written for this test (ChatML with a default system turn and
Python string methods, a Llama-2-style template with bos/eos and raise_exception, a template
using namespace(), loop controls, tojson, .split()/.startswith()/.lower()/.replace()) through
transformers' own Jinja setup (`_compile_jinja_template`: trim_blocks, lstrip_blocks,
loopcontrols, raise_exception, tojson), with and without add_generation_prompt. Nothing is
fetched; the templates are this file's. Never needed to build or test.
"""
import json
import os

from transformers.utils.chat_template_utils import _compile_jinja_template

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = '<<SYS>>\\n' + messages[0]['content'].strip() + '\\n<</SYS>>\\n\\n' %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = '' %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 %}
        {% set content = system_message + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""
FANCY = """{%- set ns = namespace(last_user=-1, turns=0) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- set ns.turns = ns.turns + 1 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
    {%- if m.role == 'tool' -%}{%- continue -%}{%- endif -%}
    {%- set words = m.content.split() -%}
    <{{ m.role | upper }} n={{ words | length }}{% if loop.index0 == ns.last_user %} last{% endif %}>
    {%- if m.content.startswith('#') -%}{{ m.content[1:].lower() }}{%- else -%}{{ m.content.replace('a', 'A') }}{%- endif -%}
    {%- if m.role == 'assistant' and m.content.endswith('!') %} {{ {'excited': true} | tojson }}{% endif -%}
    </{{ m.role }}>
    {%- if loop.index0 >= 5 -%}{%- break -%}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<ASSISTANT turns={{ ns.turns }}>{%- endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "  Hi there  "}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "# Shout QUIETLY"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is a cat?"},
     {"role": "assistant", "content": "A small animal."}, {"role": "user", "content": "And a dog?"}],
    [{"role": "user", "content": "one two three"}, {"role": "tool", "content": "ignored"},
     {"role": "assistant", "content": "banana  split!"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
     {"role": "user", "content": "cut off here"}],
]


def main():
    cases = []
    for name, src in [("chatml", CHATML), ("llama2", LLAMA2), ("fancy", FANCY)]:
        tmpl = _compile_jinja_template(src)
        for i, conv in enumerate(CONVERSATIONS):
            for gen in (False, True):
                try:
                    out = tmpl.render(messages=conv, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
                    error = None
                except Exception as e:  # the template refused: record the message
                    out, error = None, str(e)
                cases.append({"template": name, "conversation": i, "add_generation_prompt": gen,
                              "text": out, "error": error})
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "chat_template_golden.json")
    with open(path, "w") as f:
        json.dump({"templates": {"chatml": CHATML, "llama2": LLAMA2, "fancy": FANCY},
                   "conversations": CONVERSATIONS, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
