"""The official `openai` Python client against `bitnetc serve`, unmodified.

Usage: python openai_client.py BASE_URL API_KEY PROMPT EXPECTED_COMPLETION EXPECTED_CHAT
(the expected texts are the library's greedy generations: 8 tokens of PROMPT, 6 of the chat).
"""

import sys

import openai
from openai import OpenAI

url, key, prompt, expected, expected_chat = sys.argv[1:6]
client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

assert [m.id for m in client.models.list().data] == ["tiny"]

c = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
assert c.choices[0].text == expected, (c.choices[0].text, expected)
assert c.choices[0].finish_reason == "length"
assert c.usage.completion_tokens == 8

streamed = "".join(
    chunk.choices[0].text
    for chunk in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
)
assert streamed == expected, (streamed, expected)

messages = [{"role": "user", "content": "Hi"}]
r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
assert r.choices[0].message.role == "assistant"
assert r.choices[0].message.content == expected_chat, (r.choices[0].message.content, expected_chat)

parts = []
for chunk in client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == expected_chat, (parts, expected_chat)

try:
    client.completions.create(model="gpt-4", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.BadRequestError as e:
    assert "does not exist" in str(e), e

try:
    OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise SystemExit("a wrong API key was accepted")
except openai.AuthenticationError:
    pass

print("openai", openai.__version__, "ok")
