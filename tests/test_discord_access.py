"""Who may talk to Libra on Discord: server allow-list, allow- and block-lists, admin rights."""

from __future__ import annotations

import os
from pathlib import Path

import hikari

from libra.gateway.discord.access import AccessPolicy, Speaker, parse_ids

ALICE = Speaker(user="1", guild="10", channel="20", roles=frozenset({"30"}))


def test_everyone_may_talk_without_lists() -> None:
    assert AccessPolicy().may_talk(ALICE)


def test_only_allowed_servers_are_answered() -> None:
    policy = AccessPolicy(guilds=parse_ids("10, 11"))
    assert policy.may_talk(ALICE)
    assert not policy.may_talk(Speaker(user="1", guild="12", channel="20"))
    assert policy.may_talk(Speaker(user="1", channel="99")), "DMs have no server to check"


def test_lists_in_the_file_apply_and_follow_its_changes(tmp_path: Path) -> None:
    rules = tmp_path / "access.toml"
    rules.write_text('[allow]\nroles = ["30"]\nchannels = [20]\n[block]\nusers = ["2"]\n')
    policy = AccessPolicy(file=str(rules), recheck_s=0)
    assert policy.may_talk(ALICE)
    assert not policy.may_talk(Speaker(user="3", guild="10", channel="20")), "not in a role"
    assert not policy.may_talk(Speaker(user="2", guild="10", channel="20", roles=ALICE.roles))
    assert not policy.may_talk(Speaker(user="1", guild="10", channel="21", roles=ALICE.roles))
    in_thread = Speaker(user="1", guild="10", channel="20", parent="20", roles=ALICE.roles)
    assert policy.may_talk(in_thread), "a thread counts as its channel"

    rules.write_text('[block]\nchannels = ["20"]\n')
    os.utime(rules, ns=(0, 10**18))  # a different modification time, whatever the clock
    assert not policy.may_talk(ALICE)
    assert policy.may_talk(Speaker(user="3", guild="10", channel="21"))


def test_a_broken_file_keeps_the_lists_in_force(tmp_path: Path) -> None:
    rules = tmp_path / "access.toml"
    rules.write_text('[block]\nusers = ["1"]\n')
    policy = AccessPolicy(file=str(rules), recheck_s=0)
    assert not policy.may_talk(ALICE)
    rules.write_text("[block\nusers = oops")
    os.utime(rules, ns=(0, 10**18))
    assert not policy.may_talk(ALICE)


def test_people_may_be_listed_as_the_log_names_them(tmp_path: Path) -> None:
    rules = tmp_path / "access.toml"
    rules.write_text('[block]\nusers = ["discord:1"]\n')
    policy = AccessPolicy(file=str(rules), recheck_s=0)
    assert not policy.may_talk(ALICE)
    assert policy.may_talk(Speaker(user="2", guild="10", channel="20"))


def test_admins_have_manage_server_or_an_admin_role() -> None:
    policy = AccessPolicy(admin_roles=parse_ids("77"))
    none = hikari.Permissions.NONE
    assert policy.is_admin(hikari.Permissions.MANAGE_GUILD, [])
    assert policy.is_admin(none, ["77"])
    assert not policy.is_admin(hikari.Permissions.MANAGE_CHANNELS, ["5"])
    assert policy.may_set_chat_mode(hikari.Permissions.MANAGE_CHANNELS, [])
    assert policy.may_set_chat_mode(none, ["77"])
    assert not policy.may_set_chat_mode(hikari.Permissions.SEND_MESSAGES, [])
