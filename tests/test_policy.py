"""The policy is pure: every transition, with a fake clock (plain numbers)."""

from hypothesis import given
from hypothesis import strategies as st

from memwarden.policy import Action, Limits, Policy

MB = 1024 * 1024


def policy(lookahead=0.0, **kw):
    limits = dict(
        soft=800 * MB,
        hard=950 * MB,
        grace=60,
        min_uptime=10,
        max_restarts=3,
        restart_window=3600,
        reclaim=True,
        reclaim_cooldown=30,
    )
    past = kw.pop("past", ())
    limits.update(kw)
    p = Policy(Limits(**limits), started_at=0.0, past_restarts=past, lookahead=lookahead)
    assert p.at_start(100 * MB).action is Action.OK
    return p


def test_under_soft_is_ok():
    assert policy().observe(500 * MB, 100).action is Action.OK


def test_soft_breach_reclaims_first_then_waits_grace_then_restarts():
    p = policy()
    d = p.observe(850 * MB, 100)
    assert d.action is Action.RECLAIM
    p.did_reclaim(100)
    assert p.observe(850 * MB, 101).action is Action.WAIT
    assert "grace" in p.observe(850 * MB, 120).reason
    # reclaim again once the cooldown has passed, before giving up
    assert p.observe(850 * MB, 131).action is Action.RECLAIM
    p.did_reclaim(131)
    assert "grace" in p.observe(850 * MB, 159).reason
    assert p.observe(850 * MB, 160).action is Action.RESTART


def test_restart_abandoned_when_memory_falls_back_within_grace():
    p = policy(reclaim=False)
    assert p.observe(850 * MB, 100).action is Action.WAIT
    assert p.observe(700 * MB, 130).action is Action.OK
    # a new breach starts a fresh grace period
    assert p.observe(850 * MB, 140).action is Action.WAIT
    assert p.observe(850 * MB, 199).action is Action.WAIT
    assert p.observe(850 * MB, 200).action is Action.RESTART


def test_hard_limit_reclaims_once_then_kills_at_once():
    p = policy()
    assert p.observe(960 * MB, 100).action is Action.RECLAIM
    p.did_reclaim(100)
    d = p.observe(960 * MB, 100.01)
    assert d.action is Action.KILL and d.limit == 950 * MB


def test_hard_limit_ignores_uptime_and_restart_cap():
    p = policy(reclaim=False, past=[1.0, 2.0, 3.0], min_uptime=1000)
    assert p.observe(960 * MB, 5).action is Action.KILL
    p.did_kill()
    assert p.observe(990 * MB, 6).action is Action.WAIT  # kill under way: once only


def test_recycle_child_comes_before_restart():
    p = policy(reclaim=False, can_recycle=True)
    assert p.observe(850 * MB, 100).action is Action.RECYCLE_CHILD
    p.did_recycle()
    assert p.observe(850 * MB, 101).action is Action.WAIT
    assert p.observe(850 * MB, 160).action is Action.RESTART
    # a new episode may recycle again
    p2 = policy(reclaim=False, can_recycle=True)
    p2.observe(850 * MB, 1)
    p2.did_recycle()
    p2.observe(100 * MB, 2)
    assert p2.observe(850 * MB, 3).action is Action.RECYCLE_CHILD


def test_min_uptime_holds_restart_back():
    p = policy(reclaim=False, grace=0, min_uptime=300)
    d = p.observe(850 * MB, 100)
    assert d.action is Action.WAIT and "uptime" in d.reason
    assert p.observe(850 * MB, 300).action is Action.RESTART


def test_back_off_doubles_required_uptime_per_recent_restart():
    p = policy(reclaim=False, grace=0, min_uptime=100, past=[-500.0, -400.0])
    assert p.required_uptime(0) == 400
    assert p.observe(850 * MB, 399).action is Action.WAIT
    assert p.observe(850 * MB, 400).action is Action.RESTART


def test_restart_cap_per_window_is_loud_and_holds():
    p = policy(reclaim=False, grace=0, min_uptime=0, max_restarts=2, past=[-100.0, -50.0])
    d = p.observe(850 * MB, 10)
    assert d.action is Action.WAIT and "restarts in the last" in d.reason
    # once the window has moved past them, restarts are allowed again
    assert p.observe(850 * MB, 3600).action is Action.RESTART


def test_restart_decided_once():
    p = policy(reclaim=False, grace=0, min_uptime=0)
    assert p.observe(850 * MB, 10).action is Action.RESTART
    p.did_restart(10)
    assert p.observe(850 * MB, 11).action is Action.WAIT
    assert p.observe(960 * MB, 12).action is Action.KILL  # the hard limit still acts


def test_starting_above_the_limit_raises_the_alarm_and_disables_soft_restarts():
    p = Policy(Limits(soft=800 * MB, hard=950 * MB, grace=0, min_uptime=0, reclaim=False), 0.0)
    d = p.at_start(850 * MB)
    assert d.alarm and "starts at" in d.reason and d.action is Action.WAIT
    later = p.observe(850 * MB, 5000)
    assert later.action is Action.WAIT and "since start" in later.reason and not later.alarm
    assert p.observe(951 * MB, 5002).action is Action.KILL


def test_dry_run_restart_restarts_grace():
    p = policy(reclaim=False, grace=60, min_uptime=0)
    p.observe(850 * MB, 0)
    assert p.observe(850 * MB, 60).action is Action.RESTART
    p.did_dry_run(60)
    assert p.observe(850 * MB, 61).action is Action.WAIT
    assert p.observe(850 * MB, 120).action is Action.RESTART


def test_only_a_hard_limit():
    p = Policy(Limits(soft=None, hard=950 * MB, reclaim=False), 0.0)
    assert p.observe(900 * MB, 1).action is Action.OK
    assert p.observe(950 * MB, 2).action is Action.KILL


def test_no_limits_is_off():
    assert not Limits(soft=None, hard=None).enabled


@given(st.lists(st.tuples(st.integers(0, 2000), st.floats(0, 10)), min_size=1, max_size=60))
def test_invariants(readings):
    """Whatever the readings: never kill under the hard limit, never restart under the soft
    one, restart at most once per lifetime, never restart within grace of the first breach."""
    p = policy(grace=30, min_uptime=0)
    now = 0.0
    restarts = 0
    breach_start = None
    for mb, dt in readings:
        now += dt
        total = mb * MB
        d = p.observe(total, now)
        if total < 800 * MB:
            breach_start = None
        elif breach_start is None:
            breach_start = now
        if d.action is Action.KILL:
            assert total >= 950 * MB
            p.did_kill()
        if d.action is Action.RESTART:
            assert 800 * MB <= total < 950 * MB
            assert breach_start is not None and now - breach_start >= 30
            restarts += 1
            p.did_restart(now)
        if d.action is Action.RECLAIM:
            p.did_reclaim(now)
    assert restarts <= 1


def test_a_heap_that_bloats_again_is_reclaimed_again_inside_the_cooldown():
    p = policy(reclaim_regrow=50 * MB)
    assert p.observe(850 * MB, 100).action is Action.RECLAIM
    p.did_reclaim(100, 700 * MB)  # reclaim brought it back under
    assert p.observe(740 * MB, 101).action is Action.OK
    # over again but grown less than 50 MiB since the reclaim: no second reclaim yet
    p2 = policy(reclaim_regrow=50 * MB, reclaim=True)
    p2.observe(850 * MB, 100)
    p2.did_reclaim(100, 820 * MB)
    assert p2.observe(840 * MB, 105).action is Action.WAIT
    # grown 50 MiB more: reclaim again, though the 30 s cooldown has not passed
    assert p2.observe(870 * MB, 110).action is Action.RECLAIM
    # Regrowth counts from the low point after the reclaim, not from the reading just after.
    p3 = policy(reclaim_regrow=50 * MB)
    p3.observe(850 * MB, 100)
    p3.did_reclaim(100, 845 * MB)  # the pool's trims had not landed yet
    assert p3.observe(700 * MB, 100.3).action is Action.OK
    assert p3.observe(810 * MB, 104).action is Action.RECLAIM  # 110 MiB over the low point


def test_a_sustained_rise_near_the_quota_is_a_crossing_before_it_crosses():
    """Over soft and rising 400 MiB/s for two intervals: 20 ms ahead is past the hard limit,
    so it is killed now, without a reclaim (memory allocated that fast is live)."""
    p = policy(lookahead=0.02)
    assert p.observe(860 * MB, 10.00).action is Action.RECLAIM
    p.did_reclaim(10.00, 860 * MB)
    assert p.observe(868 * MB, 10.02).action is Action.WAIT  # one rise: not yet sustained
    d = p.observe(945 * MB, 10.04)  # 5 MiB short of hard, 3.8 GiB/s, before that 400 MiB/s
    assert d.action is Action.KILL and "rising" in d.reason and d.total < 950 * MB
    assert 390 * MB < p.rate < 410 * MB  # the smaller of the two rises


def test_a_single_jump_or_a_slow_rise_is_judged_on_the_reading_alone():
    p = policy(lookahead=0.02, reclaim=False)
    p.observe(700 * MB, 1.0)
    assert p.observe(940 * MB, 1.02).action is Action.WAIT  # one jump, then it stops
    assert p.observe(940 * MB, 1.04).action is Action.WAIT
    assert p.rate == 0
    slow = policy(lookahead=0.02, reclaim=False)
    for i in range(10):  # 10 MiB/s: 20 ms ahead is 0.2 MiB further
        assert slow.observe((900 + i) * MB, 1.0 + i).action is Action.WAIT
    assert slow.observe(949 * MB, 20.0).action is Action.WAIT


def test_no_lookahead_under_the_soft_limit_or_when_off():
    under = policy(lookahead=1.0)
    for i, t in enumerate((1.0, 1.1, 1.2)):  # 1 GiB/s, but still under soft
        assert under.observe((500 + 100 * i) * MB, t).action is Action.OK
    off = policy(lookahead=0.0, reclaim=False)
    for i, t in enumerate((1.0, 1.1, 1.2)):
        assert off.observe((900 + 20 * i) * MB, t).action is Action.WAIT


def test_a_reading_taken_without_projection_is_judged_where_it_is():
    """The same sustained rise, read at a job's end (``project=False``): no crossing, the
    reading is judged alone; the watchdog's next reading projects again."""
    p = policy(lookahead=0.1, reclaim=False)
    p.observe(860 * MB, 10.00, project=False)
    p.observe(880 * MB, 10.01, project=False)
    assert p.observe(900 * MB, 10.02, project=False).action is Action.WAIT  # 2 GiB/s
    assert p.observe(901 * MB, 10.03).action is Action.WAIT  # the rise stopped: no kill
    p.observe(921 * MB, 10.04)
    assert p.observe(941 * MB, 10.05).action is Action.KILL  # rising again: projected


def test_a_burst_is_projected_no_further_than_it_has_lasted_then_looked_at_soon():
    """Readings stretched to 0.1 s apart (a dear gauge) meet a burst seen over 20 ms: over
    0.1 s it would cross, over the 20 ms it has lasted it would not. No kill; the next
    reading is asked for at once, and a rise that goes on is killed from it."""
    p = policy(lookahead=0.1, reclaim=False)
    p.observe(850 * MB, 10.000)
    p.observe(860 * MB, 10.010)
    d = p.observe(870 * MB, 10.020)  # 1000 MiB/s for 20 ms: +100 MiB in 0.1 s, +20 in 20 ms
    assert d.action is Action.WAIT and p.look_soon and abs(p.rate_span - 0.02) < 1e-9
    assert p.observe(871 * MB, 10.040).action is Action.WAIT  # the burst is over
    assert not p.look_soon
    p.observe(900 * MB, 10.060)
    d = p.observe(930 * MB, 10.080)  # 1450 MiB/s for 40 ms: +58 MiB in 40 ms
    assert d.action is Action.KILL and "within 0.04s" in d.reason, d.reason


def test_readings_too_close_together_do_not_make_a_rate():
    p = policy(lookahead=0.02, reclaim=False)
    p.observe(900 * MB, 1.0)
    p.observe(905 * MB, 1.02)
    assert p.observe(945 * MB, 1.021).action is Action.WAIT  # 1 ms apart: no rate from it
    assert p.rate == 0


def test_a_rise_is_projected_no_further_than_max_lookahead():
    """However far off the next reading is (a dear gauge), a rise is projected at most
    ``MAX_LOOKAHEAD`` ahead: 300 MiB/s over 1 s would be 300 MiB, over 0.1 s it is 30."""
    p = policy(lookahead=1.0, reclaim=False)
    for i, t in enumerate((1.0, 1.1, 1.2)):
        d = p.observe((850 + 30 * i) * MB, t)
    assert d.action is Action.WAIT  # 910 MiB + 30 MiB < 950 MiB
    assert p.observe(925 * MB, 1.25).action is Action.KILL  # 925 + 30 >= 950


def test_a_reclaim_asked_of_the_pool_holds_the_recycle_until_it_settles():
    p = policy(can_recycle=True)
    assert p.observe(850 * MB, 100).action is Action.RECLAIM
    p.did_ask(100.5)  # the children trim beside their tasks
    p.did_reclaim(100, 850 * MB)
    d = p.observe(850 * MB, 100.1)
    assert d.action is Action.WAIT and "reclaim in the pool" in d.reason
    assert p.observe(960 * MB, 100.2).action is Action.KILL  # the hard limit never waits
    p.did_recover()
    assert p.observe(850 * MB, 100.6).action is Action.RECYCLE_CHILD  # it did not suffice
