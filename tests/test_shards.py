"""Sharded Pub/Sub's pure core: slots, batches per slot, the slot map and the placement."""

from __future__ import annotations

from smap_notify.cluster import NodeAddress, parse_nodes
from smap_notify.shards import SLOT_BATCH, Placement, SlotMap, channel_slot, slot_batches

A = NodeAddress("127.0.0.1", 7000)
B = NodeAddress("127.0.0.1", 7001)
C = NodeAddress("127.0.0.1", 7002)

NODES = (
    "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n"
    "b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 [5461->-c3]\n"
    "c3 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16382 16383\n"
    "d4 127.0.0.1:7003@17003 slave a1 0 0 1 connected\n"
)


def test_channel_slot_is_crc16_of_the_name_or_its_hash_tag() -> None:
    # Values from the Redis Cluster specification and redis-cli CLUSTER KEYSLOT.
    assert channel_slot("foo") == 12182
    assert channel_slot("123456789") == 0x31C3 % 16384
    assert channel_slot("user_noti:{user1000}.a") == channel_slot("{user1000}")
    # An empty tag "{}" is no tag: the whole name is hashed.
    assert channel_slot("a{}b") != channel_slot("")
    assert channel_slot("user_noti:é") == channel_slot("user_noti:\u00e9")


def test_slot_batches_never_mix_slots_and_stay_within_the_batch_size() -> None:
    tagged = [f"user_noti:{{t}}{i}" for i in range(SLOT_BATCH + 5)]
    names = ["user_noti:a", "user_noti:b", *tagged]
    batches = slot_batches(names)
    for batch in batches:
        assert len({channel_slot(n) for n in batch}) == 1, batch
        assert len(batch) <= SLOT_BATCH
    assert sorted(n for b in batches for n in b) == sorted(names)
    assert len(batches) == 4  # a, b, and the tagged ones in two


def owner_of(slots: SlotMap, slot: int) -> NodeAddress | None:
    owner = slots.owner(slot)
    return owner.address if owner is not None else None


def test_the_slot_map_reads_masters_ranges_from_cluster_nodes() -> None:
    slots = SlotMap.from_nodes(parse_nodes(NODES))
    assert owner_of(slots, 0) == A
    assert owner_of(slots, 5461) == B  # being migrated: still B's
    assert owner_of(slots, 16383) == C
    assert set(slots.masters()) == {A, B, C}
    failed = SlotMap.from_nodes(parse_nodes(NODES.replace("master - 0 0 2", "master,fail - 0 0 2")))
    assert failed.owner(6000).failed  # type: ignore[union-attr]
    partial = SlotMap.from_nodes(parse_nodes(NODES.splitlines()[0]))
    assert partial.owner(6000) is None


def owned_by(slots: SlotMap, node: NodeAddress, n: int) -> list[str]:
    out = []
    for i in range(10_000):
        name = f"user_noti:u{i}"
        owner = slots.owner(channel_slot(name))
        if owner is not None and owner.address == node:
            out.append(name)
            if len(out) == n:
                return out
    raise AssertionError


def test_placement_subscribes_on_linked_owners_and_reports_the_rest_unavailable() -> None:
    slots = SlotMap.from_nodes(parse_nodes(NODES))
    on_a, on_b = owned_by(slots, A, 2), owned_by(slots, B, 1)
    placement = Placement()
    for name in [*on_a, *on_b]:
        placement.want(name)
    assert placement.owners(slots) == {A: False, B: False}
    send, unavailable = placement.place(slots, lambda node: node == A, now=100.0)
    assert {n: sorted(c) for n, c in send.items()} == {A: sorted(on_a)}
    assert unavailable == on_b and placement.missed == {on_b[0]: 100.0}
    # Reported once, however many turns it stays down.
    assert placement.place(slots, lambda node: node == A, now=101.0) == ({}, [])
    assert placement.confirm(on_a[0], A) == (True, None)
    assert placement.confirm(on_a[1], B) == (False, None)  # not where it was asked
    assert placement.count(A) == 1 and placement.awaiting(A)
    placement.confirm(on_a[1], A)
    assert placement.count(A) == 2 and not placement.awaiting(A)
    # B is back: the channel is placed, and its confirmation says since when it missed.
    send, _ = placement.place(slots, lambda node: True, now=102.0)
    assert send == {B: on_b}
    assert placement.confirm(on_b[0], B) == (True, 100.0)
    assert placement.unavailable == set()


def test_a_lost_node_s_confirmed_channels_are_placed_again_and_marked_missed() -> None:
    slots = SlotMap.from_nodes(parse_nodes(NODES))
    (name,) = owned_by(slots, A, 1)
    placement = Placement()
    placement.want(name)
    placement.place(slots, lambda node: True, now=1.0)
    placement.confirm(name, A)
    assert placement.lose_node(A, since=5.0) == [name]
    assert placement.missed == {name: 5.0} and name not in placement.confirmed
    assert placement.count(A) == 0 and not placement.awaiting(A)
    assert placement.owners(slots) == {A: False}


def test_a_moved_slot_is_misplaced_and_a_parked_channel_waits_for_the_next_map() -> None:
    slots = SlotMap.from_nodes(parse_nodes(NODES))
    (name,) = owned_by(slots, A, 1)
    placement = Placement()
    placement.want(name)
    placement.place(slots, lambda node: True, now=1.0)
    placement.confirm(name, A)
    slot = channel_slot(name)
    moved_text = NODES.replace(" 0-5460", f" 0-{slot - 1} {slot + 1}-5460" if slot else " 1-5460")
    moved_text = moved_text.replace(" 16383\n", f" 16383 {slot}\n")
    moved = SlotMap.from_nodes(parse_nodes(moved_text))
    assert owner_of(moved, slot) == C
    assert placement.misplaced(moved) == [name]
    placement.lose(name, since=7.0, park=True)
    assert placement.place(moved, lambda node: True, now=8.0) == ({}, [])
    placement.unpark()
    send, _ = placement.place(moved, lambda node: True, now=9.0)
    assert send == {C: [name]}
    assert placement.confirm(name, C) == (True, 7.0)


def test_dropping_a_channel_names_the_node_to_unsubscribe_it_on() -> None:
    slots = SlotMap.from_nodes(parse_nodes(NODES))
    (name,) = owned_by(slots, B, 1)
    placement = Placement()
    placement.want(name)
    assert placement.drop("user_noti:never") is None
    placement.place(slots, lambda node: True, now=1.0)
    assert placement.drop(name) == B
    assert placement.wanted == {} and placement.on == {}


def test_a_failed_owner_is_needed_but_marked_failed() -> None:
    failed = SlotMap.from_nodes(parse_nodes(NODES.replace("master - 0 0 2", "master,fail - 0 0 2")))
    (name,) = owned_by(failed, B, 1)
    placement = Placement()
    placement.want(name)
    assert placement.owners(failed) == {B: True}
    assert placement.place(failed, lambda node: False, now=3.0) == ({}, [name])
