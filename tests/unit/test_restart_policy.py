"""``make run``'s supervisor's back-off (``local_triton.stack.RestartPolicy``): doubling from the
first delay up to 30 s, a stable run starting the count afresh, and a crash loop given up on."""

from __future__ import annotations

import threading

from local_triton.stack import RestartPolicy, Stack, parse_args


def test_the_back_off_doubles_from_1_s_up_to_30_s() -> None:
    policy = RestartPolicy(max_restarts=10)
    assert [policy.crashed(ran_for=1.0) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_the_supervisors_own_policy_is_1_s_to_30_s() -> None:
    """What ``make run`` uses: ``--restart-delay`` (1 s) first, 30 s at most, 5 crashes in a row."""
    stack = Stack(parse_args([]), threading.Event())
    for policy in (stack.triton_policy, stack.proxy_policy):
        assert [policy.crashed(ran_for=0.5) for _ in range(6)] == [1, 2, 4, 8, 16, None]
    stack = Stack(parse_args(["--max-restarts", "9"]), threading.Event())
    assert [stack.triton_policy.crashed(ran_for=0.5) for _ in range(10)] == [
        1,
        2,
        4,
        8,
        16,
        30,
        30,
        30,
        30,
        None,
    ]


def test_a_run_longer_than_a_minute_starts_the_count_afresh() -> None:
    policy = RestartPolicy()
    assert [policy.crashed(ran_for=1.0) for _ in range(3)] == [1, 2, 4]
    assert policy.crashed(ran_for=61.0) == 1
    assert policy.crashed(ran_for=1.0) == 2


def test_a_crash_loop_is_given_up_after_max_restarts() -> None:
    policy = RestartPolicy(max_restarts=2)
    assert [policy.crashed(ran_for=0.1) for _ in range(3)] == [1, 2, None]
