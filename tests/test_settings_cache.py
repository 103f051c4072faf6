"""Connection settings shared by the hooks of one event loop: one lookup for many triggers, never stale for
long, never a failed lookup kept, and a key changed in the connection reaches running triggers."""

from __future__ import annotations

import asyncio

import pytest

from airflow_comet.exceptions import CometAPIAuthError
from airflow_comet.hooks import _settings_cache
from airflow_comet.hooks.cometapi import CometAPIHook
from airflow_comet.triggers.prediction import PredictionTrigger
from tests.conftest import API_KEY, set_connection
from tests.scripted_server import Answer, envelope, prediction
from tests.test_trigger import create, events


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the real connection lookups (each still goes to Airflow)."""
    seen: list[str] = []
    original = CometAPIHook._alook_up_settings

    async def counting(self: CometAPIHook):
        seen.append(self.cometapi_conn_id)
        return await original(self)

    monkeypatch.setattr(CometAPIHook, "_alook_up_settings", counting)
    return seen


async def test_many_hooks_starting_together_look_the_connection_up_once(sim, lookups):
    settings = await asyncio.gather(*(CometAPIHook().aget_settings() for _ in range(200)))
    assert lookups == ["cometapi_default"]
    assert all(s is settings[0] for s in settings)
    assert settings[0].base_url == sim.base_url


async def test_an_edited_connection_reaches_new_hooks_after_the_ttl(sim, lookups, monkeypatch):
    monkeypatch.setattr(_settings_cache, "SETTINGS_TTL", 0.3)
    assert (await CometAPIHook().aget_settings()).read_timeout != 42
    set_connection(monkeypatch, sim.base_url, read_timeout=42)
    assert (await CometAPIHook().aget_settings()).read_timeout != 42  # still within the TTL
    await asyncio.sleep(0.4)
    assert (await CometAPIHook().aget_settings()).read_timeout == 42
    assert len(lookups) == 2


async def test_a_failed_lookup_is_not_kept(sim, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_COMETAPI_DEFAULT")
    with pytest.raises(Exception, match="cometapi_default"):
        await CometAPIHook().aget_settings()
    set_connection(monkeypatch, sim.base_url)
    assert (await CometAPIHook().aget_settings()).base_url == sim.base_url


def test_each_event_loop_looks_the_connection_up_itself(sim, lookups):
    async def settings_of_a_new_hook():
        return await CometAPIHook().aget_settings()

    first, second = asyncio.run(settings_of_a_new_hook()), asyncio.run(settings_of_a_new_hook())
    assert first is not second and lookups == ["cometapi_default", "cometapi_default"]


async def test_a_key_changed_in_the_connection_reaches_a_running_trigger(sim, monkeypatch):
    prediction_id = create(sim, durations=4)
    set_connection(monkeypatch, sim.base_url, key="sk-old-rotated-away")
    waiting = asyncio.ensure_future(events(PredictionTrigger(prediction_id, poll_interval=1)))
    while not any(r.status == 401 for r in sim.polls(prediction_id)):
        assert not waiting.done(), await waiting
        await asyncio.sleep(0.05)
    set_connection(monkeypatch, sim.base_url, key=API_KEY)  # the key is rotated in Airflow
    [event] = await waiting
    assert event["status"] == "succeeded"
    statuses = [r.status for r in sim.polls(prediction_id)]
    assert statuses.count(401) < 3 and statuses[-1] == 200
    assert "sk-old-rotated-away" not in repr(event)


# -- a 401 has the connection looked up again only when that can help ---------------------------------------


async def _refused(hook: CometAPIHook) -> None:
    with pytest.raises(CometAPIAuthError):
        await hook.aget_prediction("p1")


async def test_many_401s_with_the_same_key_cost_one_lookup(scripted, lookups):
    # A revoked key and many waiting triggers: each gets a 401 on each check. Looking the connection up
    # again once tells whether the key was changed; every further 401 with that key would ask again.
    scripted.script(Answer(401, envelope("Invalid token", "invalid_api_key")))
    hooks = [CometAPIHook() for _ in range(20)]
    await asyncio.gather(*(_refused(hook) for hook in hooks))  # all at once
    for _ in range(2):  # and spread out, as the shared poller sends them
        for hook in hooks:
            await _refused(hook)
    assert len(scripted.seen) == 60
    assert lookups == ["cometapi_default"] * 2  # the first, and one after the first 401
    await asyncio.gather(*(hook.aclose() for hook in hooks))


async def test_a_401_with_the_same_key_after_a_while_looks_it_up_again(scripted, lookups, monkeypatch):
    # The key fixed in Airflow some seconds after the first 401 still reaches the triggers before the TTL.
    monkeypatch.setattr(_settings_cache, "RELOOKUP_AFTER_REFUSAL", 0.3)
    scripted.script(Answer(401, envelope("Invalid token", "invalid_api_key")))
    hook = CometAPIHook()
    await _refused(hook)
    await _refused(hook)
    await _refused(hook)
    assert len(lookups) == 2
    await asyncio.sleep(0.4)
    await _refused(hook)
    await _refused(hook)
    assert len(lookups) == 3
    await hook.aclose()


async def test_a_late_401_for_the_old_key_keeps_the_new_one(scripted, lookups, monkeypatch):
    # A key rotation: a check sent with the old key answers 401 after the new key has been looked up. That
    # 401 says nothing about the new key and must not throw it away.
    set_connection(monkeypatch, scripted.url, key="sk-old-rotated-away")
    late, early = CometAPIHook(), CometAPIHook()
    await late.aget_settings()
    scripted.script(
        Answer(401, envelope("Invalid token", "invalid_api_key"), delay=1.5),  # late's, still on its way
        Answer(401, envelope("Invalid token", "invalid_api_key")),  # early's
        Answer(200, prediction(status="processing")),
    )
    in_flight = asyncio.ensure_future(_refused(late))
    while not scripted.seen:
        await asyncio.sleep(0.01)
    set_connection(monkeypatch, scripted.url, key=API_KEY)  # the key is rotated in Airflow
    await _refused(early)  # the old key's first 401: the connection is looked up again
    assert (await CometAPIHook().aget_settings()).api_key == API_KEY
    assert len(lookups) == 2
    await in_flight  # the old key's late 401
    assert (await CometAPIHook().aget_settings()).api_key == API_KEY
    assert len(lookups) == 2  # the new key was kept
    assert (await late.aget_prediction("p1"))["status"] == "processing"  # late itself moved on to it
    assert scripted.seen[-1].headers["Authorization"] == f"Bearer {API_KEY}"
    await asyncio.gather(late.aclose(), early.aclose())
