#!/usr/bin/env python3
"""Seeds the fuzz corpora (fuzz/corpus/<target>/, not committed) from real traffic samples.

Sources, each used when present:
  * tests/data/: recorded OpenAI and Anthropic responses (JSON and SSE);
  * data/alpaca_eval/: real model outputs and their instructions, wrapped in the
    OpenAI chat/completions/responses and Anthropic messages wire formats, streamed and whole;
  * policies/*.yaml and the YAML blocks of docs/policies.md: policies and their `when:` conditions;
  * fuzz/regressions/<target>/: every crash found so far.

Capture inputs carry the 4-byte header the targets read (fuzz/src/lib.rs): flags (bit 0 SSE,
bits 1-4 encoding, bit 5 small capture limit), route, split seed. Files are named by content
hash, so seeding again adds nothing twice. Usage: python3 fuzz/seed.py [corpus dir]
"""

import glob
import gzip
import hashlib
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "data", "alpaca_eval")
# A few models of different lengths and styles, a few answers each: enough shapes, small files.
MODELS = ["gpt4_1106_preview", "claude-3-opus-20240229", "alpaca-7b", "Qwen1.5-7B-Chat"]
PER_MODEL = 4
MAX_CHARS = 600


def write(corpus, target, data):
    directory = os.path.join(corpus, target)
    os.makedirs(directory, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def header(sse, encoding=0, small=False, route=0, seed=0):
    flags = int(sse) | (encoding << 1) | (int(small) << 5)
    return bytes([flags, route, seed & 0xFF, seed >> 8])


def sse(events):
    out = []
    for event, data in events:
        if event:
            out.append(f"event: {event}\n")
        out.append(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n")
    return "".join(out).encode()


def pieces(text):
    words = text.split(" ")
    return [" ".join(words[i:i + 3]) + (" " if i + 3 < len(words) else "") for i in range(0, len(words), 3)]


def openai_chat(model, text):
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1741570283, "model": model}
    events = [(None, {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    events += [(None, {**head, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces(text)]
    events.append((None, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append((None, {**head, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}}))
    events.append((None, "[DONE]"))
    whole = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1741570283, "model": model,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}}
    return sse(events), json.dumps(whole).encode()


def openai_completions(model, text):
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1690759702, "model": model}
    events = [(None, {**head, "choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]}) for p in pieces(text)]
    events.append((None, {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}))
    events.append((None, "[DONE]"))
    whole = {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    return sse(events), json.dumps(whole).encode()


def openai_responses(model, text):
    done = {"id": "resp_1", "object": "response", "status": "completed", "model": model,
            "output": [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": 12, "output_tokens": 40, "total_tokens": 52}}
    events = [("response.created", {"type": "response.created", "response": {**done, "status": "in_progress", "output": []}})]
    events.append(("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                   "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}))
    events += [("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": p}) for p in pieces(text)]
    events.append(("response.completed", {"type": "response.completed", "response": done}))
    return sse(events), json.dumps(done).encode()


def anthropic(model, text):
    events = [("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
              ("ping", {"type": "ping"})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})
               for p in pieces(text)]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}}),
               ("message_stop", {"type": "message_stop"})]
    whole = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
             "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
             "usage": {"input_tokens": 12, "output_tokens": 40}}
    return sse(events), json.dumps(whole).encode()


def requests(instruction):
    """(route selector of the request target, body)."""
    return [
        (0, {"model": "gpt-4o", "stream": True, "messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": instruction}]}),
        (0, {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": instruction}]}]}),
        (1, {"model": "gpt-3.5-turbo-instruct", "prompt": instruction, "stream": True}),
        (1, {"model": "gpt-3.5-turbo-instruct", "prompt": [instruction, [1, 2, 3]]}),
        (2, {"model": "gpt-4.1", "instructions": "Be brief.", "input": instruction}),
        (2, {"model": "gpt-4.1", "input": [{"role": "user", "content": [{"type": "input_text", "text": instruction}]},
                                          {"type": "function_call_output", "output": "42"}]}),
        (3, {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
             "messages": [{"role": "user", "content": instruction},
                          {"role": "user", "content": [{"type": "tool_result", "content": [{"type": "text", "text": "42"}]}]}]}),
    ]


def samples():
    """(model, instruction, output) from the development data, when present."""
    out = []
    for k, model in enumerate(MODELS):
        path = os.path.join(SHARED, model + ".jsonl.gz")
        if not os.path.exists(path):
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            # Different instructions per model: the same id is the same prompt in every file.
            for i, line in enumerate(f):
                if i < k * PER_MODEL:
                    continue
                if i >= (k + 1) * PER_MODEL:
                    break
                row = json.loads(line)
                out.append((row["model"], row["instruction"][:MAX_CHARS], row["output"][:MAX_CHARS]))
    return out


def capture_seeds(corpus, target, route, body, is_sse, n):
    # Plain; split; small limit; and valid gzip/zlib/raw-deflate for a few.
    write(corpus, target, header(is_sse, route=route) + body)
    write(corpus, target, header(is_sse, route=route, seed=0x1234 + n) + body)
    if n % 3 == 0:
        write(corpus, target, header(is_sse, small=True, route=route, seed=7) + body)
        write(corpus, target, header(is_sse, encoding=1 + n % 3, route=route, seed=n) + body)


def main():
    corpus = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "corpus")
    data = os.path.join(ROOT, "tests", "data")
    fixtures = {
        "openai_chat.json": ("capture_openai", 0, False), "openai_chat_stream.sse": ("capture_openai", 0, True),
        "openai_chat_tools_stream.sse": ("capture_openai", 0, True),
        "openai_completions.json": ("capture_openai", 1, False), "openai_completions_stream.sse": ("capture_openai", 1, True),
        "openai_responses.json": ("capture_openai", 2, False), "openai_responses_stream.sse": ("capture_openai", 2, True),
        "anthropic_messages.json": ("capture_anthropic", 0, False),
        "anthropic_messages_stream.sse": ("capture_anthropic", 0, True),
    }
    for n, (name, (target, route, is_sse)) in enumerate(sorted(fixtures.items())):
        path = os.path.join(data, name)
        if not os.path.exists(path):
            continue
        body = open(path, "rb").read()
        for enc in range(7):
            write(corpus, target, header(is_sse, encoding=enc, route=route, seed=n * 7 + enc) + body)
        if is_sse:
            write(corpus, "sse", bytes([0, n, 3]) + body)
            write(corpus, "sse", bytes([2 * 40 + 1, n, 5]) + body)
    for n, (model, instruction, output) in enumerate(samples()):
        for route, fmt in enumerate([openai_chat, openai_completions, openai_responses]):
            streamed, whole = fmt(model, output)
            capture_seeds(corpus, "capture_openai", route, streamed, True, n)
            capture_seeds(corpus, "capture_openai", route, whole, False, n)
        streamed, whole = anthropic(model, output)
        capture_seeds(corpus, "capture_anthropic", 0, streamed, True, n)
        capture_seeds(corpus, "capture_anthropic", 0, whole, False, n)
        write(corpus, "sse", bytes([0, n, n]) + streamed)
        for selector, body in requests(instruction):
            write(corpus, "request", bytes([selector]) + json.dumps(body, ensure_ascii=n % 2 == 0).encode())
    policies = sorted(glob.glob(os.path.join(ROOT, "policies", "*.yaml")))
    texts = [open(p, encoding="utf-8").read() for p in policies]
    docs = os.path.join(ROOT, "docs", "policies.md")
    if os.path.exists(docs):
        texts += re.findall(r"```yaml\n(.*?)```", open(docs, encoding="utf-8").read(), re.S)
    for text in texts:
        write(corpus, "policy", text.encode())
        for condition in re.findall(r"^\s*when:\s*(.+)$", text, re.M):
            write(corpus, "cel", condition.strip().encode())
    for extra in ["exchange.output_chars > 10 && exchange.route == 'chat_completions'",
                  "style.words_per_sentence > 2.5 || size(exchange.model) == 0",
                  "feature_drift.alarm", "trigger.output.matched ? gibberish.score > 0.1 : false",
                  "[1, 2, 3].exists(x, x > 2) && {'a': 1}['a'] == 1",
                  "exchange.model.startsWith('gpt') && exchange.status in [200, 201]"]:
        write(corpus, "cel", extra.encode())
    for target_dir in glob.glob(os.path.join(ROOT, "fuzz", "regressions", "*")):
        for path in glob.glob(os.path.join(target_dir, "*")):
            write(corpus, os.path.basename(target_dir), open(path, "rb").read())
    for target in sorted(os.listdir(corpus)):
        print(f"seeded {target}: {len(os.listdir(os.path.join(corpus, target)))} inputs")


if __name__ == "__main__":
    main()
