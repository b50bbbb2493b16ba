"""Runtime mode transitions: rules, API, persistence across restarts and processes."""

import asyncio
import itertools
import logging
import time

import pytest
from helpers import upload

from storage.domain import modes
from storage.errors import BadRequest, Conflict

MODES = ("edit", "rw", "ro", "ar")
ALLOWED = {("rw", "ro"), ("ro", "ar")}


@pytest.mark.parametrize("current, target", list(itertools.product(MODES, MODES + ("xx",))))
@pytest.mark.parametrize("confirm", [False, True])
def test_transition_matrix(current, target, confirm):
    if target == current or target == "xx":
        with pytest.raises(BadRequest):
            modes.check_transition(current, target, confirm)
    elif (current, target) in ALLOWED or ((current, target) == ("ro", "rw") and confirm):
        modes.check_transition(current, target, confirm)
    elif (current, target) == ("ro", "rw"):
        with pytest.raises(modes.ConfirmationRequired):
            modes.check_transition(current, target, confirm)
    else:
        with pytest.raises(modes.InvalidTransition) as err:
            modes.check_transition(current, target, confirm)
        assert isinstance(err.value, Conflict) and err.value.status == 409


async def _post(client, headers, target=None, status=200, **extra):
    body = {**({} if target is None else {"target_mode": target}), **extra}
    resp = await client.post("/api/v1/mode", json=body, headers=headers)
    data = await resp.json(content_type=None)
    assert resp.status == status, data
    return data


async def test_lifecycle_rw_ro_ar_through_the_api_with_the_matrix_enforced(app_factory, auth):
    client = await app_factory(app_mode="rw")
    admin = auth()
    first = await upload(client, admin, b"before")
    body = await _post(client, admin, "ro")
    assert (body["previous_mode"], body["current_mode"]) == ("rw", "ro")
    assert body["changed_by"] and body["transitioned_at"].endswith("+00:00")
    refused = await upload(client, admin, b"after", status=400)
    assert refused["detail"] == "File upload not allowed in ro mode"
    patch = await client.patch(f"/api/v1/files/{first['file_id']}", json={"description": "x"},
                               headers=admin)
    assert patch.status == 400
    got = await client.get(f"/api/v1/files/{first['file_id']}/download", headers=admin)
    assert got.status == 200 and await got.read() == b"before"  # reads in every mode
    info = await (await client.get("/api/v1/mode", headers=admin)).json()
    assert info["mode"] == "ro" and info["persisted"] is True
    assert info["allowed_transitions"] == ["ar", "rw"]
    assert info["allowed_operations"] == ["download", "list"]
    await _post(client, admin, "ar")
    assert (await (await client.get("/api/v1/info")).json())["status"] == "maintenance"
    got = await client.get(f"/api/v1/files/{first['file_id']}/download", headers=admin)
    assert got.status == 200
    body = await _post(client, admin, "rw", status=409, confirm=True)
    assert body["type"].endswith("invalid_transition") and "ar" in body["detail"]


async def test_backward_step_needs_confirm_and_bad_requests_are_4xx(app_factory, auth):
    client = await app_factory(app_mode="ro")
    admin = auth()
    body = await _post(client, admin, "rw", status=409)
    assert body["type"].endswith("confirmation_required") and "confirm" in body["detail"]
    await _post(client, admin, "rw", status=409, confirm=False)
    await _post(client, admin, "ro", status=400)  # same mode
    await _post(client, admin, "nope", status=400)  # unknown mode
    assert (await _post(client, admin, status=422))["errors"][0]["loc"] == ["body",
                                                                             "target_mode"]
    await _post(client, admin, 5, status=422)
    await _post(client, admin, "rw", status=422, confirm="yes")
    resp = await client.post("/api/v1/mode", data=b"{bad", headers=admin)
    assert resp.status == 400
    resp = await client.post("/api/v1/mode", data=b"[1]", headers=admin)
    assert resp.status == 400
    resp = await client.post("/api/v1/mode", json={"target_mode": "rw", "confirm": True})
    assert resp.status == 401
    for role in ("operator", "user", "readonly"):
        resp = await client.post("/api/v1/mode", json={"target_mode": "rw", "confirm": True},
                                 headers=auth(role=role))
        assert resp.status == 403, role
    body = await _post(client, admin, "RW", confirm=True)
    assert (body["previous_mode"], body["current_mode"]) == ("ro", "rw")
    alias = await client.post("/api/v1/mode/transition", json={"target_mode": "ro"},
                              headers=admin)
    assert alias.status == 200 and (await alias.json())["current_mode"] == "ro"


async def test_edit_is_isolated(client, auth):
    for target in ("rw", "ro", "ar"):
        body = await _post(client, auth(), target, status=409, confirm=True)
        assert "edit" in body["detail"]


async def test_history_newest_first_with_who_and_when(app_factory, auth):
    client = await app_factory(app_mode="rw")
    await _post(client, auth(sub="alice-sub", name="alice"), "ro")
    await _post(client, auth(sub="bob-sub", name="bob"), "rw", confirm=True)
    await _post(client, auth(sub="carol-sub", name="carol"), "ro")
    resp = await client.get("/api/v1/mode/history", headers=auth(token_type="admin_user"))
    history = (await resp.json())["history"]
    assert [(h["from_mode"], h["to_mode"], h["changed_by"]) for h in history] == [
        ("rw", "ro", "carol-sub"), ("ro", "rw", "bob-sub"), ("rw", "ro", "alice-sub")]
    assert all(set(h) == {"from_mode", "to_mode", "changed_by", "changed_at"} for h in history)
    assert history[0]["changed_at"] >= history[1]["changed_at"] >= history[2]["changed_at"]
    resp = await client.get("/api/v1/mode/history?limit=1", headers=auth())
    assert len((await resp.json())["history"]) == 1
    assert (await client.get("/api/v1/mode/history?limit=x", headers=auth())).status == 400
    assert (await client.get("/api/v1/mode/history")).status == 401


async def test_history_is_for_admins_only(client, auth):
    """The README says admin only; any valid token used to read it (issue 19)."""
    for role in ("operator", "user", "readonly"):
        for token_type in ("service_account", "admin_user"):
            resp = await client.get("/api/v1/mode/history",
                                    headers=auth(role=role, token_type=token_type))
            body = await resp.json(content_type=None)
            assert (resp.status, body["detail"]) == (403, "Admin access required: role admin")
    resp = await client.get("/api/v1/mode/history", headers=auth(token_type="admin_user"))
    assert resp.status == 200 and (await resp.json()) == {"history": []}


async def test_persisted_mode_survives_restart_and_overrides_app_mode(app_factory, auth,
                                                                      caplog, prefix):
    first = await app_factory(app_mode="rw", table_prefix=prefix)
    await _post(first, auth(), "ro")
    await first.close()
    caplog.set_level(logging.WARNING, logger="storage.domain.modes")
    again = await app_factory(app_mode="rw", table_prefix=prefix)
    info = await (await again.get("/api/v1/info")).json()
    assert info["mode"] == "ro"
    overridden = [r for r in caplog.records
                  if "APP_MODE=rw is overridden by the persisted mode ro" in r.getMessage()]
    assert [r.levelno for r in overridden] == [logging.WARNING]
    await upload(again, auth(), b"x", status=400)
    history = await (await again.get("/api/v1/mode/history", headers=auth())).json()
    assert len(history["history"]) == 1


async def test_second_process_sees_a_change_within_a_second(app_factory, auth, prefix):
    a = await app_factory(app_mode="rw", table_prefix=prefix)
    b = await app_factory(app_mode="rw", table_prefix=prefix)
    await _post(a, auth(), "ro")
    t0 = time.monotonic()
    while (await (await b.get("/api/v1/info")).json())["mode"] != "ro":
        assert time.monotonic() - t0 < 1.0, "process B did not see the change within 1 s"
        await asyncio.sleep(0.02)
    await upload(b, auth(), b"x", status=400)


async def test_concurrent_changes_through_two_processes_serialise(app_factory, auth, prefix):
    a = await app_factory(app_mode="rw", table_prefix=prefix)
    b = await app_factory(app_mode="rw", table_prefix=prefix)
    body = {"target_mode": "ro"}
    ra, rb = await asyncio.gather(a.post("/api/v1/mode", json=body, headers=auth()),
                                  b.post("/api/v1/mode", json=body, headers=auth()))
    assert sorted([ra.status, rb.status]) == [200, 400]  # the loser sees "already in ro"
    history = await (await a.get("/api/v1/mode/history", headers=auth())).json()
    assert len(history["history"]) == 1
