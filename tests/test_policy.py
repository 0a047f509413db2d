"""The policy is pure: every transition, with a fake clock (plain numbers)."""

from hypothesis import given
from hypothesis import strategies as st

from memwarden.events import Cause, State
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
    # a new breach, once the dip is older than the trend window: a fresh grace period
    assert p.observe(850 * MB, 170).action is Action.WAIT
    assert p.observe(850 * MB, 229).action is Action.WAIT
    assert p.observe(850 * MB, 230).action is Action.RESTART


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
    one, restart at most once per lifetime, and within grace of the first breach only when
    memory rises towards the hard limit."""
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
            assert breach_start is not None
            assert now - breach_start >= 30 or "rising" in d.reason, d.reason
            restarts += 1
            p.did_restart(now)
        if d.action is Action.RECLAIM:
            p.did_reclaim(now)
    assert restarts <= 1


def test_a_heap_that_bloats_again_is_reclaimed_again_inside_the_cooldown():
    p = policy(reclaim_regrow=50 * MB)
    assert p.observe(850 * MB, 100).action is Action.RECLAIM
    p.did_reclaim(100, 700 * MB)  # reclaim brought it back under
    assert p.observe(700 * MB, 101).action is Action.OK
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
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
    assert p.observe(860 * MB, 10.00).action is Action.RECLAIM
    p.did_reclaim(10.00, 860 * MB)
    assert p.observe(868 * MB, 10.02).action is Action.WAIT  # one rise: not yet sustained
    d = p.observe(945 * MB, 10.04)  # 5 MiB short of hard, 3.8 GiB/s, before that 400 MiB/s
    assert d.action is Action.KILL and "rising" in d.reason and d.total < 950 * MB
    assert 390 * MB < p.rate < 410 * MB  # the smaller of the two rises


def test_a_single_jump_or_a_slow_rise_is_judged_on_the_reading_alone():
    p = policy(lookahead=0.02, reclaim=False)
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
    p.observe(700 * MB, 1.0)
    assert p.observe(940 * MB, 1.02).action is Action.WAIT  # one jump, then it stops
    assert p.observe(940 * MB, 1.04).action is Action.WAIT
    assert p.rate == 0
    slow = policy(lookahead=0.02, reclaim=False)
    slow.did_restart(0.0)  # a restart under way: the projection alone may kill
    for i in range(10):  # 10 MiB/s: 20 ms ahead is 0.2 MiB further
        assert slow.observe((900 + i) * MB, 1.0 + i).action is Action.WAIT
    assert slow.observe(949 * MB, 20.0).action is Action.WAIT


def test_no_lookahead_under_the_soft_limit_or_when_off():
    under = policy(lookahead=1.0)
    under.did_restart(0.0)  # a restart under way: the projection alone may kill
    for i, t in enumerate((1.0, 1.1, 1.2)):  # 1 GiB/s, but still under soft
        assert under.observe((500 + 100 * i) * MB, t).action is Action.OK
    off = policy(lookahead=0.0, reclaim=False)
    off.did_restart(0.0)  # a restart under way: the projection alone may kill
    for i, t in enumerate((1.0, 1.1, 1.2)):
        assert off.observe((900 + 20 * i) * MB, t).action is Action.WAIT


def test_a_reading_taken_without_projection_is_judged_where_it_is():
    """The same sustained rise, read at a job's end (``project=False``): no crossing, the
    reading is judged alone; the watchdog's next reading projects again."""
    p = policy(lookahead=0.1, reclaim=False)
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
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
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
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
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
    p.observe(900 * MB, 1.0)
    p.observe(905 * MB, 1.02)
    assert p.observe(945 * MB, 1.021).action is Action.WAIT  # 1 ms apart: no rate from it
    assert p.rate == 0


def test_a_rise_is_projected_no_further_than_max_lookahead():
    """However far off the next reading is (a dear gauge), a rise is projected at most
    ``MAX_LOOKAHEAD`` ahead: 300 MiB/s over 1 s would be 300 MiB, over 0.1 s it is 30."""
    p = policy(lookahead=1.0, reclaim=False)
    p.did_restart(0.0)  # a restart under way: the projection alone may kill
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


CAUSES_TO_HOLD = (Cause.STARTS_ABOVE, Cause.RESTART_UNDER_WAY, Cause.CAPPED, Cause.KILL_UNDER_WAY)


@given(
    st.lists(st.tuples(st.integers(0, 1200), st.floats(0.01, 10)), min_size=1, max_size=80),
    st.booleans(),
    st.sampled_from([None, True, False]),
)
def test_no_rung_starves_the_restart(readings, reclaim, busy):
    """Whatever the readings and however often a reclaim is re-armed: a reading over the
    soft limit for longer than the grace (and the uptime) is a restart, or the decision
    says why not (the start was over the limit, a restart or kill is under way, the cap)."""
    p = policy(grace=30, min_uptime=0, reclaim=reclaim, reclaim_regrow=1 * MB)
    now, breach_start = 0.0, None
    for mb, dt in readings:
        now += dt
        total = mb * MB
        d = p.observe(total, now, busy=busy)
        assert isinstance(d.cause, Cause), d  # every decision says why, for code
        if d.action is Action.RECLAIM:
            p.did_reclaim(now, total)
            d = p.observe(total, now, busy=busy)  # the warden decides again after it
        breach_start = None if total < 800 * MB else (breach_start or now)
        if d.action is Action.KILL:
            p.did_kill()
        elif d.action is Action.RESTART:
            p.did_restart(now)
        elif breach_start is not None and now - breach_start > 30 and total < 950 * MB:
            assert d.action is Action.WAIT, d
            assert d.cause in CAUSES_TO_HOLD, d


def test_reclaims_that_keep_coming_do_not_starve_the_restart():
    """The issue's solo worker: soft 200 MB, grace 1 s, each job keeps 25 MB and each
    reclaim frees some but not enough (re-armed by regrowth every time). Within a second of
    growth the restart comes, long before the hard limit."""
    p = Policy(
        Limits(soft=200 * MB, hard=400 * MB, grace=1, reclaim_regrow=20 * MB), started_at=0.0
    )
    p.at_start(80 * MB)
    total, now = 190 * MB, 1.0
    for _ in range(20):
        total += 25 * MB
        now += 0.25
        d = p.observe(total, now, busy=True)
        if d.action is Action.RECLAIM:
            total -= 5 * MB
            p.did_reclaim(now, total)
            d = p.observe(total, now, busy=True)
        if d.action is Action.RESTART:
            break
    assert d.action is Action.RESTART and total < 300 * MB, (d, total // MB)


def test_a_reclaim_that_dips_just_under_the_soft_limit_ends_no_episode():
    """A fragmented heap that each reclaim trims just under the soft limit and that is over
    it again moments later lives at the limit: the grace runs on from the first crossing,
    and the restart comes when it is over."""
    p = policy(reclaim_regrow=20 * MB, min_uptime=0)
    now, d = 100.0, None
    while now < 200:
        d = p.observe(850 * MB, now, busy=True)
        if d.action is Action.RECLAIM:
            p.did_reclaim(now, 790 * MB)
            d = p.observe(790 * MB, now + 0.1, busy=True)
        if d.action is Action.RESTART:
            break
        d = p.observe(790 * MB, now + 1, busy=True)  # paused: the jobs in hand go on
        assert d.action is Action.WAIT and d.cause is Cause.JUST_UNDER, d
        now += 5
    assert d is not None and d.action is Action.RESTART, d
    assert 160 <= now < 170  # the grace (60 s) from the first crossing, not from the last
    # A deep dip ends the episode: the grace starts afresh at the next crossing.
    q = policy(reclaim=False)
    assert q.observe(850 * MB, 100).action is Action.WAIT
    assert q.observe(700 * MB, 101).action is Action.OK
    assert q.observe(850 * MB, 102).action is Action.WAIT
    assert q.observe(850 * MB, 161).action is Action.WAIT
    # So does a long one, however shallow.
    r = policy(reclaim=False)
    assert r.observe(850 * MB, 100).action is Action.WAIT
    assert r.observe(790 * MB, 101).cause is Cause.JUST_UNDER  # paused, jobs in hand
    assert r.observe(850 * MB, 140).action is Action.WAIT
    assert r.observe(850 * MB, 161).action is Action.WAIT


def test_a_reclaim_just_under_the_soft_limit_keeps_intake_paused_until_the_jobs_end():
    """Intake pauses at the crossing, beside the reclaim. A trim that wins memory back only
    just under the limit keeps it paused while jobs are in hand; then a worker that can only
    restart restarts (its drain is instant). A deep dip resumes at once."""
    p = policy(min_uptime=3600)
    assert p.observe(850 * MB, 100, busy=True).action is Action.RECLAIM
    assert p.paused
    p.did_reclaim(100, 790 * MB)
    d = p.observe(790 * MB, 100.01, busy=True)
    assert d.action is Action.WAIT and d.cause is Cause.JUST_UNDER and p.paused, d
    d = p.observe(795 * MB, 100.5, busy=False)  # the jobs in hand are done
    assert d.action is Action.RESTART and d.cause is Cause.NO_JOB_IN_HAND, d
    q = policy()
    q.observe(850 * MB, 100, busy=True)
    q.did_reclaim(100, 600 * MB)
    assert q.observe(600 * MB, 100.01, busy=True).action is Action.OK
    assert not q.paused
    # Long under the limit, however shallow: intake resumes.
    r = policy()
    r.observe(850 * MB, 100, busy=True)
    r.did_reclaim(100, 790 * MB)
    assert r.observe(790 * MB, 100.01, busy=True).action is Action.WAIT
    assert r.observe(790 * MB, 131, busy=True).action is Action.OK and not r.paused


def test_the_state_says_paused_while_intake_is_paused_just_under_the_soft_limit():
    p = policy(min_uptime=3600)
    p.observe(850 * MB, 100, busy=True)
    assert p.paused and p.state(850 * MB) is State.OVER_SOFT
    p.did_reclaim(100, 790 * MB)
    assert p.observe(790 * MB, 100.01, busy=True).cause is Cause.JUST_UNDER
    assert p.state(790 * MB) is State.PAUSED
    assert p.observe(790 * MB, 131, busy=True).action is Action.OK  # long under: resumed
    assert p.state(790 * MB) is State.OK


def test_a_pool_recycles_a_child_before_a_regrown_heap_is_trimmed_again():
    """Prefork, each job churning: the reclaim trims the heap just under the limit, the next
    jobs take it over again. The next rung is the recycle, not one more trim."""
    p = policy(reclaim_regrow=20 * MB, can_recycle=True)
    assert p.observe(850 * MB, 100).action is Action.RECLAIM
    p.did_reclaim(100, 780 * MB)
    assert p.observe(780 * MB, 100.1, busy=False).action is Action.OK  # a pool resumes
    assert not p.paused
    d = p.observe(850 * MB, 100.5)  # 70 MiB regrown: trimmed again, before
    assert d.action is Action.RECYCLE_CHILD, d
    p.did_recycle()
    # Once the pool has had its recycle, a regrown heap is trimmed again.
    assert p.observe(850 * MB, 100.6).action is Action.RECLAIM


def test_at_the_hard_limit_a_rising_memory_is_killed_without_a_reclaim():
    """Rising at the hard limit, the memory is live: a reclaim would only give it the time
    to reach the quota (seen: a poison job in a threads pool OOM-killed by the kernel while
    the warden reclaimed). Level at the hard limit, the reclaim is still tried first."""
    p = policy(reclaim_regrow=None)
    p.observe(900 * MB, 1.0)
    assert p.observe(960 * MB, 1.02).action is Action.KILL
    level = policy()
    level.observe(960 * MB, 1.0)
    assert level.observe(960 * MB, 1.02).action is Action.RECLAIM


def test_intake_pauses_only_where_a_restart_can_follow():
    """Over the soft limit intake pauses, but not for a worker that started over it nor
    one whose restarts are capped: it would stop serving for good (seen: a Celery worker
    started over its soft limit paused and never ran a task)."""
    p = policy(reclaim=False)
    p.observe(850 * MB, 100)
    assert p.paused
    assert p.observe(700 * MB, 101).action is Action.OK and not p.paused
    above = Policy(Limits(soft=800 * MB, hard=950 * MB, reclaim=False), 0.0)
    above.at_start(850 * MB)
    above.observe(860 * MB, 100)
    assert not above.paused
    capped = policy(reclaim=False, max_restarts=1, past=[50.0])
    d = capped.observe(850 * MB, 100)
    assert d.capped and not capped.paused


def pressed(**kw):
    """A policy with the pressure trigger on: full 40% held for 30 s."""
    return policy(pressure_full=0.40, pressure_hold=30, **kw)


def test_pressure_not_held_for_the_hold_time_changes_nothing():
    p = pressed()
    assert p.observe(500 * MB, 100, pressure=0.52).action is Action.OK
    assert p.observe(500 * MB, 129, pressure=0.52).action is Action.OK
    # a dip under the threshold starts the hold afresh
    assert p.observe(500 * MB, 130, pressure=0.10).action is Action.OK
    assert p.observe(500 * MB, 131, pressure=0.60).action is Action.OK
    assert p.observe(500 * MB, 160, pressure=0.60).action is Action.OK
    assert not p.paused


def test_pressure_held_reclaims_then_pauses_then_restarts_with_a_pressure_reason():
    p = pressed()
    p.observe(500 * MB, 100, pressure=0.52)
    d = p.observe(500 * MB, 131, pressure=0.52)
    assert d.action is Action.RECLAIM
    assert d.reason == "memory pressure: full 52% for 31.0s"
    p.did_reclaim(131, 490 * MB)
    # the reclaim gets time to show in avg10; intake is paused meanwhile
    d = p.observe(490 * MB, 132)  # no new figure: the last one stands
    assert d.action is Action.WAIT and "PSI" in d.reason and p.paused
    d = p.observe(490 * MB, 141.5, pressure=0.55)
    assert d.action is Action.RESTART
    assert d.reason.startswith("memory pressure: full 55% for 41.5s"), d.reason
    assert p.loops  # a pressure restart counts towards the cap, wherever it started
    p.did_restart(141.5)
    assert p.observe(490 * MB, 142, pressure=0.55).action is Action.WAIT


def test_pressure_that_falls_away_resumes_intake():
    p = pressed(reclaim=False, min_uptime=1000)
    p.observe(500 * MB, 100, pressure=0.5)
    d = p.observe(500 * MB, 130, pressure=0.5)
    assert d.action is Action.WAIT and "uptime" in d.reason and p.paused
    assert p.observe(500 * MB, 131, pressure=0.05).action is Action.OK
    assert not p.paused and not p.loops


def test_pressure_is_off_by_default():
    p = policy(reclaim=False, min_uptime=0)
    for t in range(0, 300, 10):
        assert p.observe(500 * MB, t, pressure=0.99).action is Action.OK


def test_under_the_soft_limit_pressure_restarts_without_the_grace_over_it_memory_rules():
    p = pressed(reclaim=False, min_uptime=0, grace=600)
    p.observe(500 * MB, 100, pressure=0.9)
    d = p.observe(500 * MB, 130, pressure=0.9)
    assert d.action is Action.RESTART and "pressure" in d.reason  # the hold was the grace
    over = pressed(reclaim=False, min_uptime=0, grace=600)
    over.observe(850 * MB, 100, pressure=0.9)
    d = over.observe(850 * MB, 130, pressure=0.9)
    assert d.action is Action.WAIT and "grace" in d.reason and "over soft limit" in d.reason
    assert not over.loops  # started low: a memory restart stays a cure


def test_pressure_restarts_are_capped_and_respect_a_start_over_the_limit():
    p = pressed(reclaim=False, min_uptime=0, max_restarts=2, past=[50.0, 60.0])
    p.observe(500 * MB, 100, pressure=0.9)
    d = p.observe(500 * MB, 130, pressure=0.9)
    assert d.action is Action.WAIT and d.capped and "pressure" in d.reason
    assert not p.paused
    above = Policy(
        Limits(soft=800 * MB, hard=950 * MB, reclaim=False, min_uptime=0, pressure_full=0.4), 0.0
    )
    above.at_start(850 * MB)
    above.observe(500 * MB, 100, pressure=0.9)
    d = above.observe(500 * MB, 130, pressure=0.9)
    assert d.action is Action.WAIT and "soft restarts are off" in d.reason


def test_the_hard_limit_still_kills_under_pressure():
    p = pressed(reclaim=False)
    p.observe(500 * MB, 100, pressure=0.9)
    assert p.observe(960 * MB, 131, pressure=0.9).action is Action.KILL


def test_a_restart_is_called_off_well_under_the_soft_limit_and_not_again_at_once():
    p = Policy(Limits(soft=100 * MB, hard=120 * MB), started_at=0.0)
    assert not p.may_call_off(95 * MB, 10.0)  # just under: the next crossing is at hand
    assert p.may_call_off(80 * MB, 10.0)
    p.did_call_off(10.0)
    assert not p.may_call_off(50 * MB, 25.0)  # over again 15 s later: the level, no spike
    assert p.may_call_off(50 * MB, 40.0)
    assert not Policy(Limits(soft=None, hard=120 * MB), 0.0).may_call_off(0, 1.0)


# ----------------------------------------------------------------------------- causes
def test_each_soft_rung_says_its_cause():
    """Code reads the cause, never the prose: each decision of the soft ladder carries one."""
    p = policy(can_recycle=True, min_uptime=0)
    assert p.observe(500 * MB, 1).cause is Cause.UNDER_SOFT
    d = p.observe(850 * MB, 100)
    assert (d.action, d.cause) == (Action.RECLAIM, Cause.OVER_SOFT)
    p.did_ask(100.5)
    p.did_reclaim(100, 850 * MB)
    d = p.observe(850 * MB, 100.1)
    assert (d.action, d.cause) == (Action.WAIT, Cause.RECLAIM_SETTLING)
    d = p.observe(850 * MB, 101)
    assert (d.action, d.cause) == (Action.RECYCLE_CHILD, Cause.OVER_SOFT)
    p.did_recycle()
    d = p.observe(850 * MB, 120)
    assert (d.action, d.cause) == (Action.WAIT, Cause.GRACE)
    assert p.observe(850 * MB, 160).cause is Cause.OVER_SOFT  # the reclaim, once more
    p.did_reclaim(160, 850 * MB)
    d = p.observe(850 * MB, 160)
    assert (d.action, d.cause) == (Action.RESTART, Cause.GRACE_OVER)
    p.did_restart(160)
    d = p.observe(850 * MB, 161)
    assert (d.action, d.cause) == (Action.WAIT, Cause.RESTART_UNDER_WAY)


def test_the_hard_limit_says_its_cause():
    p = policy()
    d = p.observe(960 * MB, 100)
    assert (d.action, d.cause) == (Action.RECLAIM, Cause.OVER_HARD)
    p.did_reclaim(100)
    d = p.observe(960 * MB, 100.01)
    assert (d.action, d.cause) == (Action.KILL, Cause.OVER_HARD)
    p.did_kill()
    d = p.observe(990 * MB, 100.02)
    assert (d.action, d.cause) == (Action.WAIT, Cause.KILL_UNDER_WAY)


def test_a_projected_crossing_says_its_cause():
    p = policy(lookahead=0.02)
    p.did_restart(0.0)
    p.observe(860 * MB, 10.00)
    p.did_reclaim(10.00, 860 * MB)
    p.observe(868 * MB, 10.02)
    d = p.observe(945 * MB, 10.04)
    assert (d.action, d.cause) == (Action.KILL, Cause.PROJECTED_HARD)


def test_the_restarts_cut_short_say_why():
    idle = policy(reclaim=False, min_uptime=0)
    d = idle.observe(850 * MB, 100, busy=False)
    assert (d.action, d.cause) == (Action.RESTART, Cause.NO_JOB_IN_HAND)
    rising = policy(reclaim=False, min_uptime=0, grace=60)
    assert rising.observe(810 * MB, 100).cause is Cause.GRACE
    d = rising.observe(830 * MB, 101)  # 20 MiB/s: the hard limit in 6 s, the grace is 60 s
    assert (d.action, d.cause) == (Action.RESTART, Cause.GROWTH)


def test_what_holds_a_restart_back_says_its_cause():
    uptime = policy(reclaim=False, grace=0, min_uptime=300)
    assert uptime.observe(850 * MB, 100).cause is Cause.UPTIME
    capped = policy(reclaim=False, grace=0, min_uptime=0, max_restarts=2, past=[-100.0, -50.0])
    d = capped.observe(850 * MB, 10)
    assert (d.action, d.cause, d.capped) == (Action.WAIT, Cause.CAPPED, True)
    assert not uptime.observe(850 * MB, 101).capped
    above = Policy(Limits(soft=800 * MB, hard=950 * MB, reclaim=False), 0.0)
    d = above.at_start(850 * MB)
    assert (d.action, d.cause, d.alarm) == (Action.WAIT, Cause.STARTS_ABOVE, True)
    assert above.observe(850 * MB, 5000).cause is Cause.STARTS_ABOVE
    assert policy().at_start(100 * MB).cause is Cause.STARTS_UNDER


def test_pressure_says_its_cause_on_every_rung():
    p = pressed()
    p.observe(500 * MB, 100, pressure=0.52)
    d = p.observe(500 * MB, 131, pressure=0.52)
    assert (d.action, d.cause) == (Action.RECLAIM, Cause.PRESSURE)
    p.did_reclaim(131, 490 * MB)
    d = p.observe(490 * MB, 132)
    assert (d.action, d.cause) == (Action.WAIT, Cause.PRESSURE_SETTLING)
    d = p.observe(490 * MB, 141.5, pressure=0.55)
    assert (d.action, d.cause) == (Action.RESTART, Cause.PRESSURE)
    idle = pressed(reclaim=False, min_uptime=0)
    idle.observe(500 * MB, 100, pressure=0.9)
    d = idle.observe(500 * MB, 130, pressure=0.9, busy=False)
    assert (d.action, d.cause) == (Action.RESTART, Cause.PRESSURE)  # pressure, not the limit


def test_the_state_uses_the_metric_names():
    p = policy(reclaim=False)
    assert p.state(None) is State.OK and p.state(500 * MB) is State.OK
    p.observe(850 * MB, 100)
    assert p.state(850 * MB) is State.OVER_SOFT
    assert p.state(960 * MB) is State.OVER_HARD
    p.did_restart(101)
    assert p.state(850 * MB) is State.RESTARTING
    p.did_kill()
    assert p.state(960 * MB) is State.KILLED
    off = Policy(Limits(soft=None, hard=None), 0.0)
    assert off.state(960 * MB) is State.OFF
    assert [s.value for s in State] == [
        "ok",
        "paused",
        "over_soft_limit",
        "over_hard_limit",
        "restarting",
        "killed",
        "off",
    ]
