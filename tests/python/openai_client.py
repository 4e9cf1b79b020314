"""Drives the gateway with the official `openai` Python client, unchanged but for base_url.

Usage: openai_client.py BASE_URL
Prints one JSON object: what the client saw, non-streamed and streamed.
"""

import json
import sys

import openai


def main() -> None:
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="sk-python-client-test", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    completion = client.chat.completions.create(model="test-model", messages=messages)
    plain = completion.choices[0].message.content

    stream = client.chat.completions.create(model="test-model", messages=messages, stream=True)
    pieces = []
    chunks = 0
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                pieces.append(choice.delta.content)

    error_type = None
    try:
        client.chat.completions.create(model="test-model", messages=messages, extra_body={"trigger_error": True})
    except openai.APIStatusError as err:
        error_type = type(err).__name__

    json.dump(
        {
            "plain": plain,
            "streamed": "".join(pieces),
            "chunks": chunks,
            "request_id": completion._request_id,
            "error_type": error_type,
            "openai_version": openai.__version__,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
