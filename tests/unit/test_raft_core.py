"""RaftCore, rule by rule. Each test names the rule of the Raft paper (Ongaro & Ousterhout
2014, "§") or of Ongaro's thesis (2014, "thesis §") that it checks.

`Net` is a lossless in-process network under the test's control: messages wait in
`inbox` until delivered (optionally dropping some), and every Ready is handled in
the required order (persist → send → apply → advance).
"""

from __future__ import annotations

import random
from typing import Callable

import pytest

from coordinator.raft import NotLeader, ProposalRejected, RaftCore, RaftState, Ready, Role, initial_state
from coordinator.raft_config import RaftConfig
from coordinator.raft_messages import Entry, EntryType, HardState, Message, MessageKind, encode_voters

CFG = RaftConfig()
E = CFG.election_ticks


class Net:
    def __init__(self, ids: list[str], *, config: RaftConfig = CFG, states: dict[str, RaftState] | None = None) -> None:
        states = states or {}
        self.cores = {
            i: RaftCore(config, i, random.Random(k), states.get(i, initial_state(ids))) for k, i in enumerate(ids)
        }
        self.inbox: list[Message] = []
        self.applied: dict[str, list[Entry]] = {i: [] for i in ids}
        self.readies: dict[str, list[Ready]] = {i: [] for i in ids}

    def add(self, node_id: str, state: RaftState = RaftState()) -> RaftCore:
        self.cores[node_id] = RaftCore(CFG, node_id, random.Random(len(self.cores)), state)
        self.applied[node_id] = []
        self.readies[node_id] = []
        return self.cores[node_id]

    def drain(self, node_id: str) -> None:
        core = self.cores[node_id]
        while core.has_ready():
            rd = core.ready()
            self.readies[node_id].append(rd)
            self.inbox.extend(rd.messages)
            self.applied[node_id].extend(rd.committed_entries)
            core.advance(rd)

    def deliver(
        self, drop: Callable[[Message], bool] = lambda m: False, hold: Callable[[Message], bool] = lambda m: False
    ) -> None:
        """Deliver until quiet; `drop`ped messages are lost, `hold`ed ones stay in the inbox."""
        for i in self.cores:
            self.drain(i)
        held: list[Message] = []
        while self.inbox:
            batch, self.inbox = self.inbox, []
            for m in batch:
                if hold(m):
                    held.append(m)
                elif m.to in self.cores and not drop(m):
                    self.cores[m.to].step(m)
                    self.drain(m.to)
        self.inbox = held

    def take(self, kind: MessageKind) -> list[Message]:
        for i in self.cores:
            self.drain(i)
        picked = [m for m in self.inbox if m.kind is kind]
        self.inbox = [m for m in self.inbox if m.kind is not kind]
        return picked

    def tick(self, node_id: str, n: int = 1) -> None:
        for _ in range(n):
            self.cores[node_id].tick()
        self.drain(node_id)

    def elect(self, node_id: str) -> RaftCore:
        self.tick(node_id, 2 * E)  # past any randomized timeout in [E, 2E)
        self.deliver(hold=lambda m: m.kind is MessageKind.APP)  # the NOOP stays unsent
        core = self.cores[node_id]
        assert core.role is Role.LEADER
        return core

    def heartbeat(self, leader: str, drop: Callable[[Message], bool] = lambda m: False) -> None:
        self.tick(leader, CFG.heartbeat_ticks)
        self.deliver(drop)


def ids(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def log_state(voters: list[str], terms: list[int], term: int, commit: int = 1) -> RaftState:
    """A disk state whose log has entry 1 = the configuration, then entries of `terms`."""
    entries = [Entry(1, 1, EntryType.CONF_CHANGE, encode_voters(voters))]
    entries += [Entry(i, t, EntryType.NORMAL, b"%d" % i) for i, t in enumerate(terms, start=2)]
    return RaftState(HardState(term, None, commit), None, tuple(entries))


# --- elections (§5.2, §5.4.1) ---------------------------------------------------------------


def test_election_a_timed_out_follower_becomes_leader_with_a_noop() -> None:
    """§5.2: a follower that hears nothing for its election timeout campaigns and wins with a
    majority; §8: the new leader appends a NOOP of its term, which then commits everywhere."""
    net = Net(ids(3))
    leader = net.elect("n1")
    assert leader.term == 2
    noop = leader.log.entry(leader.log.last_index)
    assert noop.type is EntryType.NOOP and noop.term == 2
    net.deliver()
    net.heartbeat("n1")  # carries the new commit index to the followers
    for i in ids(3):
        assert net.cores[i].log.committed == noop.index
        assert net.applied[i][-1] == noop
        assert net.cores[i].lead == "n1"


def test_election_safety_one_vote_per_term_persisted_before_the_answer() -> None:
    """§5.2 election safety / Fig. 2: a server grants at most one vote per term, and the vote
    is in the same Ready's hard state as the granting message (persisted before it is sent)."""
    net = Net(ids(3), config=CFG.replace(pre_vote=False))
    voter = net.cores["n3"]
    voter.step(Message(MessageKind.VOTE, "n1", "n3", 2, index=1, log_term=1))
    rd = voter.ready()
    assert rd.hard_state == HardState(2, "n1", 1)
    assert [m.reject for m in rd.messages if m.kind is MessageKind.VOTE_RESP] == [False]
    voter.advance(rd)
    voter.step(Message(MessageKind.VOTE, "n2", "n3", 2, index=1, log_term=1))
    assert [m.reject for m in voter.ready().messages] == [True]


def test_vote_denied_to_a_candidate_with_a_less_up_to_date_log() -> None:
    """§5.4.1: a voter refuses a candidate whose last entry has a lower term, or the same term
    and a lower index (so a leader always holds every committed entry)."""
    state = log_state(ids(3), [2, 2], term=2)
    for last_index, last_term, granted in [(3, 2, True), (2, 2, False), (9, 1, False), (2, 3, True)]:
        voter = RaftCore(CFG.replace(pre_vote=False), "n3", random.Random(0), state)
        voter.step(Message(MessageKind.VOTE, "n1", "n3", 3, index=last_index, log_term=last_term))
        (resp,) = voter.ready().messages
        assert resp.reject is not granted, (last_index, last_term)


def test_candidate_steps_down_on_an_append_of_its_term() -> None:
    """§5.2: a candidate that hears from a leader of its own term returns to follower."""
    net = Net(ids(3), config=CFG.replace(pre_vote=False))
    net.tick("n1", 2 * E)
    cand = net.cores["n1"]
    assert cand.role is Role.CANDIDATE
    cand.step(Message(MessageKind.APP, "n2", "n1", cand.term, index=1, log_term=1))
    assert cand.role is Role.FOLLOWER and cand.lead == "n2"


# --- pre-vote and check-quorum (thesis §9.6, §6.2) ------------------------------------------


def test_pre_vote_an_isolated_node_does_not_raise_its_term() -> None:
    """Thesis §9.6: a partitioned server only sends pre-votes (for term+1) and keeps its term,
    however many election timeouts pass."""
    net = Net(ids(3))
    net.tick("n1", 20 * E)
    core = net.cores["n1"]
    assert core.term == 1 and core.role is Role.PRE_CANDIDATE
    sent = {m.kind for m in net.inbox}
    assert sent == {MessageKind.PRE_VOTE} and all(m.term == 2 for m in net.inbox)


def test_pre_vote_a_follower_with_a_live_leader_ignores_vote_requests() -> None:
    """Thesis §6.2 / §9.6 (disruptive servers): a follower that heard from its leader within
    the minimum election timeout neither grants nor changes term for a (pre-)vote request,
    so a rejoining server cannot depose a working leader."""
    net = Net(ids(3))
    net.elect("n1")
    net.deliver()
    follower = net.cores["n2"]
    for kind in (MessageKind.PRE_VOTE, MessageKind.VOTE):
        follower.step(Message(kind, "n3", "n2", 5, index=99, log_term=9))
        assert follower.term == 2 and not follower.ready().messages


def test_check_quorum_a_leader_cut_off_from_the_majority_steps_down() -> None:
    """Thesis §6.2: a leader that has not heard from a majority for election_ticks steps down
    (so clients stop trusting a stale leader); one that hears from a majority does not."""
    net = Net(ids(3))
    leader = net.elect("n1")
    for _ in range(2 * E):
        net.heartbeat("n1", drop=lambda m: m.to == "n3" or m.sender == "n3")
    assert leader.role is Role.LEADER  # n2 still answers: a majority with n1
    for _ in range(2 * E):
        net.heartbeat("n1", drop=lambda m: m.sender != "n1")
    assert leader.role is Role.FOLLOWER and leader.term == 2


def test_stale_leader_learns_the_new_term_from_an_append_response() -> None:
    """etcd Step: a server that gets an append of a lower term answers with its own term, so a
    deposed leader (which pre-vote keeps from hearing vote requests) steps down."""
    net = Net(ids(3))
    old = net.elect("n1")
    old.step(Message(MessageKind.APP_RESP, "n2", "n1", 7))
    assert old.role is Role.FOLLOWER and old.term == 7


# --- log replication (§5.3) -------------------------------------------------------------------


def test_log_matching_follower_rejects_an_append_whose_previous_entry_differs() -> None:
    """§5.3 consistency check: an append whose (prevLogIndex, prevLogTerm) the follower does not
    hold is refused, and the follower's log is unchanged."""
    f = RaftCore(CFG, "n2", random.Random(0), log_state(ids(3), [2], term=2))
    f.step(Message(MessageKind.APP, "n1", "n2", 3, index=2, log_term=3, entries=(Entry(3, 3),)))
    (resp,) = f.ready().messages
    assert resp.reject and resp.index == 2
    assert f.log.last_index == 2


def test_fast_back_off_repairs_a_divergent_log_in_two_probes() -> None:
    """§5.3 (and etcd's findConflictByTerm): with leader terms 1 3 3 3 5 5 5 5 5 and follower
    terms 1 1 1 1 2 2, the rejection hint (index 6, term 2) lets the leader skip straight to
    index 1; the follower's conflicting suffix is truncated (Ready.truncate_from) and replaced."""
    voters = ids(2)
    leader_state = log_state(voters, [3, 3, 3, 5, 5, 5, 5, 5], term=5)
    follower_state = log_state(voters, [1, 1, 1, 2, 2], term=2)
    net = Net(voters, states={"n1": leader_state, "n2": follower_state})
    net.tick("n1", 2 * E)
    pre = net.take(MessageKind.PRE_VOTE)
    assert pre
    net.cores["n1"].step(Message(MessageKind.PRE_VOTE_RESP, "n2", "n1", 6))
    net.drain("n1")
    net.take(MessageKind.VOTE)
    net.cores["n1"].step(Message(MessageKind.VOTE_RESP, "n2", "n1", 6))
    leader = net.cores["n1"]
    assert leader.role is Role.LEADER
    probes: list[Message] = []
    net.deliver(drop=lambda m: probes.append(m) if m.kind is MessageKind.APP else False)  # type: ignore[func-returns-value]
    # One rejected probe, then the append that repairs everything (later ones only carry commit).
    assert [(m.index, m.log_term) for m in probes][:2] == [(9, 5), (1, 1)]
    assert probes[1].entries[-1].index == 10
    follower = net.cores["n2"]
    assert [follower.log.term(i) for i in range(1, 11)] == [1, 3, 3, 3, 5, 5, 5, 5, 5, 6]
    truncations = [rd.truncate_from for rd in net.readies["n2"] if rd.truncate_from is not None]
    assert truncations and truncations[0] == 2


def test_commit_only_entries_of_the_current_term_by_counting_replicas() -> None:
    """§5.4.2 (Fig. 8): a leader does not commit an entry of an earlier term even when a majority
    stores it; it commits once an entry of its own term is stored by a majority."""
    voters = ids(3)
    state = log_state(voters, [2], term=2)
    net = Net(voters, states={i: state for i in voters})
    leader = net.elect("n1")  # term 3, NOOP at index 3
    net.take(MessageKind.APP)
    leader.step(Message(MessageKind.APP_RESP, "n2", "n1", leader.term, index=2))
    net.drain("n1")
    assert leader.log.committed == 1  # entry 2 (term 2) is on a majority but not committable
    leader.step(Message(MessageKind.APP_RESP, "n2", "n1", leader.term, index=3))
    net.drain("n1")
    assert leader.log.committed == 3


def test_state_machine_safety_every_server_applies_the_same_entries_in_order() -> None:
    """§5.4.3: proposals committed through the leader are applied by every server, in the same
    order, exactly once; propose returns the (index, term) they are applied at."""
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    placed = [leader.propose(b"cmd%d" % i) for i in range(5)]
    net.deliver()
    net.heartbeat("n1")
    for i in ids(3):
        normal = [(e.index, e.term, e.data) for e in net.applied[i] if e.type is EntryType.NORMAL]
        assert normal == [(ix, t, b"cmd%d" % k) for k, (ix, t) in enumerate(placed)]


def test_leader_counts_its_own_log_only_once_persisted() -> None:
    """Fig. 2 / persist before send: a single-voter leader commits its entry only at advance(),
    i.e. after the Ready carrying it was persisted."""
    net = Net(["solo"])
    leader = net.elect("solo")
    index, _ = leader.propose(b"x")
    rd = leader.ready()
    assert rd.entries[-1].index == index and leader.log.committed < index
    leader.advance(rd)
    assert leader.log.committed == index


def test_which_readys_must_be_fsynced_and_which_messages_may_leave_first() -> None:
    """Fig. 2 asks a promise (vote, term) to be durable before it is sent; thesis §10.2.1 lets a
    leader send its appends while it writes them; a commit index alone needs no fsync (etcd
    MustSync: losing it in a crash only means learning it again)."""
    net = Net(ids(3), config=CFG.replace(pre_vote=False))
    candidate = net.cores["n1"]
    for _ in range(2 * E):
        candidate.tick()
    campaign = candidate.ready()  # new term and a vote for itself: durable, then sent
    assert campaign.hard_state is not None and campaign.must_sync and not campaign.send_before_persist
    candidate.advance(campaign)
    net.inbox.extend(campaign.messages)
    net.deliver()  # elected; its NOOP replicated, so the followers are in the replicate state
    assert candidate.role is Role.LEADER
    candidate.propose(b"x")
    append = candidate.ready()  # the leader's entries: fsync'd, but its appends may go first
    assert append.entries and append.must_sync and append.send_before_persist
    assert any(m.kind is MessageKind.APP for m in append.messages)
    candidate.advance(append)
    net.inbox.extend(append.messages)
    net.deliver()
    net.heartbeat("n1")  # carries the new commit index to the followers
    commit_only, before = [], HardState()
    for rd in net.readies["n2"]:
        if rd.hard_state is not None:
            if not rd.entries and (rd.hard_state.term, rd.hard_state.vote) == (before.term, before.vote):
                commit_only.append(rd)
            before = rd.hard_state
    assert commit_only and all(not rd.must_sync and not rd.send_before_persist for rd in commit_only)
    # A follower's acknowledgement of entries is a promise: fsync'd and sent only after.
    acks = [rd for rd in net.readies["n2"] if rd.entries]
    assert acks and all(rd.must_sync and not rd.send_before_persist for rd in acks)


def test_a_leader_that_steps_down_within_a_ready_sends_nothing_before_its_persist() -> None:
    """Fig. 2: a leader that learns of a higher term in the same turn becomes a follower whose
    answers (at the new term, with its vote) are promises: the Ready must be durable first."""
    net = Net(ids(3), config=CFG.replace(pre_vote=False))
    leader = net.elect("n1")
    net.deliver()
    leader.propose(b"x")
    # Before the shell takes a Ready, a heartbeat of a newer leader (a higher term) arrives.
    leader.step(Message(MessageKind.HEARTBEAT, "n2", "n1", leader.term + 1))
    rd = leader.ready()
    assert leader.role is Role.FOLLOWER and rd.hard_state is not None and rd.hard_state.term == leader.term
    assert rd.must_sync and not rd.send_before_persist


def test_propose_on_a_follower_raises_not_leader_with_a_hint() -> None:
    """Only the leader appends (§5.3); followers name the leader they know."""
    net = Net(ids(3))
    net.elect("n1")
    net.deliver()
    with pytest.raises(NotLeader) as info:
        net.cores["n2"].propose(b"x")
    assert info.value.leader_hint == "n1"


# --- snapshots (§7) ---------------------------------------------------------------------------


def test_snapshot_install_for_a_follower_behind_the_compacted_log() -> None:
    """§7 InstallSnapshot: once the leader compacted past a follower's next entry it sends its
    snapshot; the follower's Ready carries it (persist, restore the state machine) and drops
    its log, then applies only entries after it."""
    net = Net(ids(3))
    leader = net.elect("n1")
    down = lambda m: m.to == "n3" or m.sender == "n3"  # noqa: E731
    for i in range(10):
        leader.propose(b"k%d" % i)
    net.deliver(drop=down)
    net.heartbeat("n1", drop=down)
    snap = leader.compact(leader.log.applied, b"state@%d" % leader.log.applied)
    assert leader.log.first_index == snap.index + 1 and snap.voters == tuple(ids(3))
    leader.propose(b"after")
    net.deliver()
    net.heartbeat("n1")
    f = net.cores["n3"]
    installed = [rd.snapshot for rd in net.readies["n3"] if rd.snapshot is not None]
    assert installed == [snap]
    assert f.log.snapshot == snap and f.log.committed == leader.log.committed
    assert [e.data for e in net.applied["n3"] if e.index > snap.index][-1] == b"after"


# --- membership (thesis §4.1) -----------------------------------------------------------------


def test_membership_one_change_at_a_time() -> None:
    """Thesis §4.1: the leader refuses a second change while the first is uncommitted, and any
    change before an entry of its own term committed; the new configuration is in force as
    soon as it is appended (the leader replicates to the new voter at once)."""
    net = Net(ids(3))
    leader = net.elect("n1")
    with pytest.raises(ProposalRejected):
        leader.add_voter("n4")  # the NOOP of this term is not committed yet
    net.deliver()
    net.add("n4")
    leader.add_voter("n4")
    assert "n4" in leader.voters and leader.progress("n4") is not None
    with pytest.raises(ProposalRejected):
        leader.remove_voter("n2")
    net.deliver()
    net.heartbeat("n1")
    assert set(net.cores["n4"].voters) == set(ids(4)) and net.cores["n4"].log.committed == leader.log.committed
    leader.remove_voter("n2")
    net.deliver()
    assert set(leader.voters) == {"n1", "n3", "n4"}


def test_removed_leader_steps_down_once_its_removal_commits() -> None:
    """Thesis §4.2.2: a leader may remove itself; it keeps replicating (not counting itself)
    until that entry commits, then steps down; the rest elect a new leader and it never campaigns."""
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    leader.remove_voter("n1")
    with pytest.raises(NotLeader):
        leader.propose(b"x")
    net.deliver()
    assert leader.role is Role.FOLLOWER and not leader.promotable
    net.tick("n1", 5 * E)
    assert leader.role is Role.FOLLOWER and not net.inbox
    for _ in range(3 * E):
        net.tick("n2")
        net.tick("n3")
        net.deliver()
    assert {net.cores[i].role for i in ("n2", "n3")} == {Role.LEADER, Role.FOLLOWER}
    assert leader.role is Role.FOLLOWER


def test_a_new_config_entry_reverts_when_its_entry_is_truncated() -> None:
    """Thesis §4.1: servers use the latest configuration in their log, committed or not, so a
    follower that loses an uncommitted change to a conflict returns to the previous one."""
    f = RaftCore(CFG, "n2", random.Random(0), log_state(ids(3), [], term=2))
    change = Entry(2, 2, EntryType.CONF_CHANGE, encode_voters(ids(4)))
    f.step(Message(MessageKind.APP, "n1", "n2", 2, index=1, log_term=1, entries=(change,)))
    assert set(f.voters) == set(ids(4))
    f.step(Message(MessageKind.APP, "n3", "n2", 3, index=1, log_term=1, entries=(Entry(2, 3, EntryType.NOOP),)))
    assert set(f.voters) == set(ids(3))


# --- leadership transfer (thesis §3.10) ------------------------------------------------------


def test_leadership_transfer_sends_timeout_now_and_the_target_wins_through_the_lease() -> None:
    """Thesis §3.10: the leader stops taking proposals, sends TimeoutNow to an up-to-date
    target, which campaigns at once; its forced vote requests override the followers'
    leader lease (check-quorum), so it wins without waiting for a timeout."""
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    assert leader.transfer_leadership("n2") == "n2"
    with pytest.raises(NotLeader) as info:
        leader.propose(b"x")
    assert info.value.leader_hint == "n2"
    net.deliver()
    assert net.cores["n2"].role is Role.LEADER and net.cores["n2"].term == 3
    assert leader.role is Role.FOLLOWER and leader.lead == "n2"


def test_leadership_transfer_is_abandoned_after_an_election_timeout() -> None:
    """Thesis §3.10: if the target does not take over within an election timeout, the leader
    resumes accepting proposals."""
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    leader.transfer_leadership("n2")
    net.inbox.clear()  # TimeoutNow lost
    for _ in range(E):
        net.heartbeat("n1", drop=lambda m: m.kind is MessageKind.TIMEOUT_NOW)
    assert leader.role is Role.LEADER and leader.lead_transferee is None
    leader.propose(b"x")


# --- linearizable reads (thesis §6.4) ---------------------------------------------------------


def test_read_index_is_confirmed_by_a_majority_heartbeat_round() -> None:
    """Thesis §6.4 ReadIndex: the leader answers (commit index, context) only after a majority
    acknowledged a heartbeat sent after the request; without that round, nothing."""
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    leader.read_index(b"r1")
    net.deliver(drop=lambda m: m.kind is MessageKind.HEARTBEAT_RESP)
    assert not any(rd.read_states for rd in net.readies["n1"])
    leader.read_index(b"r2")
    net.deliver()
    states = [rs for rd in net.readies["n1"] for rs in rd.read_states]
    assert [(s.context, s.index) for s in states] == [(b"r1", leader.log.committed), (b"r2", leader.log.committed)]


def test_read_index_waits_for_an_entry_of_the_leaders_term() -> None:
    """Thesis §6.4: a new leader does not know the commit index until its NOOP commits."""
    net = Net(ids(3))
    leader = net.elect("n1")
    leader.read_index(b"early")
    assert leader.log.term(leader.log.committed) != leader.term
    net.deliver()
    net.heartbeat("n1")
    states = [rs for rd in net.readies["n1"] for rs in rd.read_states]
    assert [s.context for s in states] == [b"early"] and states[0].index >= 2


# --- restart ----------------------------------------------------------------------------------


def test_restart_from_persisted_state_keeps_term_vote_and_redelivers_committed_entries() -> None:
    """Fig. 2: currentTerm, votedFor and log[] are persistent; a restarted server resumes them
    and hands committed-but-unapplied entries to the state machine again."""
    state = RaftState(HardState(4, "n2", 3), None, log_state(ids(3), [2, 3], term=4).entries)
    core = RaftCore(CFG, "n1", random.Random(0), state)
    assert (core.term, core.vote) == (4, "n2")
    rd = core.ready()
    assert rd.hard_state is None and rd.entries == ()
    assert [e.index for e in rd.committed_entries] == [1, 2, 3]


# --- a cluster of one, and when a new leader may decide ---------------------------------------


def test_a_single_voter_campaigns_at_once_and_is_ready_once_its_noop_is_applied() -> None:
    """etcd's Campaign: a lone voter elects itself without waiting an election timeout.
    `leader_ready` (thesis §6.4's condition for reads, here for every decision) waits for the NOOP."""
    net = Net(["solo"])
    core = net.cores["solo"]
    core.campaign()
    assert core.role is Role.LEADER and core.term == 2
    assert not core.leader_ready  # its NOOP is not durable, so not committed nor applied
    rd = core.ready()
    assert [e.type for e in rd.entries] == [EntryType.NOOP]
    core.advance(rd)  # persisted: the only voter's log is the majority
    net.drain("solo")
    assert core.leader_ready and core.log.applied == 2


def test_a_new_leader_is_not_ready_before_it_applies_an_entry_of_its_term() -> None:
    net = Net(ids(3))
    leader = net.elect("n1")
    assert leader.role is Role.LEADER and not leader.leader_ready
    net.deliver()  # the NOOP replicates and commits
    assert leader.leader_ready


def test_campaign_does_nothing_on_a_leader_or_a_non_voter() -> None:
    net = Net(["solo"])
    core = net.cores["solo"]
    core.campaign()
    term = core.term
    core.campaign()
    assert (core.role, core.term) == (Role.LEADER, term)
    blank = net.add("blank")
    blank.campaign()
    assert blank.role is Role.FOLLOWER and blank.term == 0


# --- heartbeats outside the Ready cycle (agent/raft_log.py, "Heartbeats while the loop is busy") --


def test_heartbeat_now_is_a_leaders_broadcast_between_ready_and_advance_that_the_next_tick_skips() -> None:
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    rd = leader.ready() if leader.has_ready() else None  # a Ready in flight: the shell is busy
    beats = leader.heartbeat_now()
    assert sorted(m.to for m in beats) == ["n2", "n3"]
    assert all(m.kind is MessageKind.HEARTBEAT and m.term == leader.term for m in beats)
    assert all(m.commit <= leader.log.committed for m in beats)
    if rd is not None:
        leader.advance(rd)
    leader.tick()  # the tick queued meanwhile: its broadcast was already sent
    assert [m for m in leader.ready().messages if m.kind is MessageKind.HEARTBEAT] == []
    leader.tick()  # the one after beats as usual
    assert len([m for m in leader.ready().messages if m.kind is MessageKind.HEARTBEAT]) == 2
    assert net.cores["n2"].heartbeat_now() == ()  # only a leader beats


def test_heartbeat_now_keeps_a_follower_from_campaigning() -> None:
    net = Net(ids(3))
    leader = net.elect("n1")
    net.deliver()
    follower = net.cores["n2"]
    for _ in range(3 * E):
        leader.tick()  # the shell's queued ticks...
        beats = leader.heartbeat_now()  # ...while it sends the beats itself
        for m in beats:
            net.cores[m.to].step(m)
        follower.tick()
        net.drain("n1")
        net.deliver()
    assert follower.role is Role.FOLLOWER and follower.lead == "n1" and leader.role is Role.LEADER
