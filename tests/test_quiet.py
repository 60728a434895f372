"""``d2export.quiet.libraries_quiet``: the silence d2export puts around library calls, from threads."""

from __future__ import annotations

import threading
import warnings

from d2export.quiet import libraries_quiet


def test_overlapping_threads_leave_the_hosts_filters_as_they_were():
    """Thread A enters, thread B enters, A leaves, B leaves: with ``warnings.catch_warnings`` B
    restored the filters it saved while A was inside, and "ignore everything" stayed for the host."""
    before = list(warnings.filters)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with libraries_quiet():
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def b():
        a_inside.wait(5)
        with libraries_quiet():
            b_inside.set()
            a_left.wait(5)
            seen["silenced"] = warnings.filters[0][0] == "ignore"  # still quiet while B is inside

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["silenced"]
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("the host's own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["the host's own"]
