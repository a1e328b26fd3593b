import pytest
from tests.conftest import start_stack
from workers.tiny_tools import TOOLS, WEATHER_QUESTION

@pytest.fixture(scope="module")
def stack(redis_url, prepared_models, tmp_path_factory):
    running, procs = start_stack(redis_url, prepared_models.cache_dir, tmp_path_factory.mktemp("p"), "tiny-gpt-oss")
    yield running
    procs.stop_all()

def test_probe(stack):
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(model="tiny-gpt-oss", messages=[{"role":"user","content":WEATHER_QUESTION}], tools=TOOLS, temperature=0, max_tokens=100)
    print("C", raw.parse().choices[0].message)

def test_probe2(stack):
    from workers.tiny_tools import run_tool
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    client = stack.client()
    first = client.responses.create(model="tiny-gpt-oss", input=WEATHER_QUESTION, tools=flat, tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=100)
    print("R", first.output)
    call = first.output[-1]
    answer = client.responses.create(model="tiny-gpt-oss", previous_response_id=first.id, input=[{"type": "function_call_output", "call_id": call.call_id, "output": run_tool(call.name, call.arguments)}], tools=flat, temperature=0, max_output_tokens=100)
    print("R", answer.output, answer.usage)
