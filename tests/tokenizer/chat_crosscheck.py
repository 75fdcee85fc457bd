"""Compares troupe's chat-template rendering with Jinja2 configured as transformers configures it
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, its tojson and raise_exception), on
conversations the golden data does not cover: tools, tool calls (dict and string arguments), tool
responses, reasoning_content, thinking on/off, system prompts, multi-turn. Prints every difference;
exit status 1 if any. Usage: chat_crosscheck.py --tool tokenizer_tool --model-dir DIR
"""
import argparse
import json
import subprocess
import sys

from jinja2.sandbox import ImmutableSandboxedEnvironment

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "巴黎"}}}
CALL_STR = {"function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}

CONVERSATIONS = [
    ([{"role": "user", "content": "hi"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS),
    ([{"role": "user", "content": "weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [CALL]},
      {"role": "tool", "content": "{\"temp\": 21}"},
      {"role": "tool", "content": "sunny"}], TOOLS),
    ([{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_STR, CALL]},
      {"role": "tool", "content": "21C"},
      {"role": "assistant", "content": "<think>\nok\n</think>\n\nIt is 21C."},
      {"role": "user", "content": "thanks"}], TOOLS),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "a", "reasoning_content": "because"},
      {"role": "user", "content": "<tool_response>x</tool_response>"}], None),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "  spaced  "},
      {"role": "assistant", "content": "\n\nanswer\n"}], None),
]


def transformers_env():
    def raise_exception(message):
        raise ValueError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--model-dir", required=True)
    args = ap.parse_args()
    config = json.load(open(f"{args.model_dir}/tokenizer_config.json", encoding="utf-8"))
    template = transformers_env().from_string(config["chat_template"])
    special = {k: (config.get(k) or "") for k in ["bos_token", "eos_token", "pad_token", "unk_token"]}
    requests = []
    for messages, tools in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            for thinking in (None, False, True):
                r = {"messages": messages, "tools": tools,
                     "add_generation_prompt": add_generation_prompt}
                if thinking is not None:
                    r["enable_thinking"] = thinking
                requests.append(r)
    run = subprocess.run([args.tool, "--chat", args.model_dir], capture_output=True, text=True,
                         input="".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests))
    if run.returncode != 0:
        print(run.stderr)
        return 1
    ours = [json.loads(line) for line in run.stdout.split("\n") if line]
    bad = 0
    for r, mine in zip(requests, ours):
        context = dict(special, **{k: v for k, v in r.items()})
        want = template.render(**context)
        if mine.get("text") != want:
            bad += 1
            print(f"MISMATCH {json.dumps(r, ensure_ascii=False)}\n  jinja2: {want!r}\n"
                  f"  troupe: {mine.get('text', mine.get('error'))!r}")
    print(f"{args.model_dir}: {len(requests)} renderings, {bad} mismatches")
    return 1 if bad or len(ours) != len(requests) else 0


if __name__ == "__main__":
    sys.exit(main())
