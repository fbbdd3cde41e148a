"""Agent frameworks that speak the Responses API, through the router to a chat-only backend (the
mock provider) and to the native OpenAI fake: the OpenAI Agents SDK and LangChain's
``ChatOpenAI(use_responses_api=True)``. Both are in the ``test`` extra."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess
from tests.test_responses_api import ALICE, CHAT_ONLY, KEYS, NATIVE, access_lines, config

agents = pytest.importorskip("agents", reason="openai-agents is in the test extra: pip install -e '.[test]'")
langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the test extra")


@pytest.fixture
def router(fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> RouterProcess:
    return start_router(config(fake_openai), env=KEYS)


def test_agents_sdk_runs_an_agent_with_a_function_tool(router: RouterProcess) -> None:
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # its exporter would call api.openai.com
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def run(streamed: bool) -> Any:
        sdk = AsyncOpenAI(base_url=router.v1, api_key=ALICE, max_retries=0)
        model = agents.OpenAIResponsesModel(model=CHAT_ONLY, openai_client=sdk)
        agent = agents.Agent(
            name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model
        )
        if not streamed:
            return await agents.Runner.run(agent, "What is the weather in Paris?")
        result = agents.Runner.run_streamed(agent, "What is the weather in Paris?")
        kinds = [event.type async for event in result.stream_events()]
        assert "raw_response_event" in kinds
        return result

    for streamed in (False, True):
        result = asyncio.run(run(streamed))
        assert "sunny in" in str(result.final_output), result.final_output
    assert len(calls) == 2 and all(isinstance(city, str) for city in calls)
    lines = access_lines(router)
    assert len(lines) == 4 and all(line["status"] == 200 and line["key"] == "alice" for line in lines)


@pytest.mark.parametrize("model", [CHAT_ONLY, NATIVE])
def test_langchain_chat_openai_with_the_responses_api(router: RouterProcess, model: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = langchain_openai.ChatOpenAI(
        model=model, base_url=router.v1, api_key=ALICE, use_responses_api=True, max_retries=0
    )
    question = HumanMessage("What is the weather in Paris?")
    asked = llm.bind_tools([get_weather]).invoke([question])
    assert asked.tool_calls and asked.tool_calls[0]["name"] == "get_weather"
    call = asked.tool_calls[0]
    answer = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([question, asked, answer])
    assert final.text, final
    if model == CHAT_ONLY:
        assert "sunny in" in final.text
    streamed = "".join(chunk.text for chunk in llm.stream("Say hello"))
    assert streamed
