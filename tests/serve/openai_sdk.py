"""Driven by openai_sdk.sh: the official SDK's chat and completions calls, streaming and not,
against a real `cluster serve --block`; greedy SDK output equals the raw HTTP token ids; structured
output through parse() with a pydantic model and forced tool calls."""
import json, os, re, signal, subprocess, sys, tempfile, typing

import openai
import pydantic

cluster, golden = sys.argv[1], os.environ.get("TROUPE_GOLDEN_DIR", sys.argv[2])
model = os.path.join(golden, "models", "tiny-qwen3")
yaml = os.path.join(tempfile.mkdtemp(prefix="troupe-sdk-"), "model.yaml")
with open(yaml, "w") as f:
    f.write(f"model: {model}\ndevice: cpu\nserved_model_name: tiny\nmax_model_len: 256\nnum_kv_blocks: 64\n"
            "port: 0\napi_key: sdk-key\n")
proc = subprocess.Popen([cluster, "serve", yaml, "--block"], stdout=subprocess.PIPE, text=True)
try:
    line = proc.stdout.readline()
    base = re.search(r"at (http://\S+/v1)", line).group(1)
    client = openai.OpenAI(base_url=base, api_key="sdk-key", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    extra = {"ignore_eos": True, "return_token_ids": True}
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                          temperature=0, extra_body=extra)
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length", chat
    assert chat.usage.completion_tokens == 8, chat.usage
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == text, (parts, text)
    assert usage and usage.completion_tokens == 8, usage
    # The same prompt ids through /v1/completions give the same greedy tokens.
    ids = chat.model_extra["prompt_token_ids"]
    comp = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                                     extra_body=extra)
    assert comp.choices[0].text == text, (comp.choices[0].text, text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ids, max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text, (streamed, text)
    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass
    try:
        client.chat.completions.create(model="other", messages=msgs)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        client.completions.create(model="tiny", prompt=[5] * 300)
        raise AssertionError("oversize prompt accepted")
    except openai.BadRequestError as e:
        assert "maximum context length" in str(e), e
    # A tool round trip as the SDK sends it: tools, then the assistant's tool call (content None)
    # and the tool's answer. The random-weight model answers in text.
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=tools,
                                            max_tokens=4, temperature=0, extra_body=extra)
    assert answer.choices[0].finish_reason == "length", answer
    assert not answer.choices[0].message.tool_calls, answer
    # Structured output: parse() with a pydantic model (the SDK sends a strict json_schema) and
    # tool_choice "required" / a named function (streamed), constrained so that they always parse.
    class Weather(pydantic.BaseModel):
        city: typing.Literal["Paris", "Lyon", "Nice"]
        rain: bool
        temp: int = pydantic.Field(ge=-20, le=45)
    for seed in range(3):
        parsed = client.chat.completions.parse(model="tiny", messages=msgs, response_format=Weather,
                                               max_tokens=200, temperature=1.0, seed=seed)
        assert isinstance(parsed.choices[0].message.parsed, Weather), parsed
    tools[0]["function"]["parameters"]["properties"]["city"]["maxLength"] = 8
    tools[0]["function"]["parameters"]["required"] = ["city"]
    # No max_tokens: the tools take most of the 256-token context; one call fits in the rest.
    forced = client.chat.completions.create(model="tiny", messages=msgs, tools=tools,
                                            tool_choice="required", parallel_tool_calls=False,
                                            temperature=1.0, seed=1)
    assert forced.choices[0].finish_reason == "tool_calls", forced
    for call in forced.choices[0].message.tool_calls:
        assert call.function.name == "get_weather", call
        assert isinstance(json.loads(call.function.arguments)["city"], str), call
    named = {"type": "function", "function": {"name": "get_weather"}}
    names, args = set(), {}
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, tools=tools,
                                                tool_choice=named, temperature=1.0, seed=2,
                                                stream=True):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function and call.function.name:
                names.add(call.function.name)
            if call.function and call.function.arguments:
                args[call.index] = args.get(call.index, "") + call.function.arguments
    assert names == {"get_weather"} and args, (names, args)
    assert all("city" in json.loads(a) for a in args.values()), args
    try:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                       extra_body={"guided_regex": "(unclosed"})
        raise AssertionError("a bad regex was accepted")
    except openai.BadRequestError as e:
        assert "guided_regex" in str(e), e
    biased = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                            temperature=0.7, seed=3, logit_bias={"13": 100},
                                            extra_body=extra)
    assert biased.choices[0].model_extra["token_ids"] == [13] * 4, biased
    print(f"PASS: openai {openai.__version__}: {text!r}")
finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
