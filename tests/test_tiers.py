"""The two test tiers of tests/conftest.py: every test is in exactly one, and a quick test starts no interpreter."""
import subprocess
import sys

import pytest


def test_every_collected_test_is_in_exactly_one_tier(request):
    tiers = {item.nodeid: [t for t in ('quick', 'slow') if item.get_closest_marker(t)] for item in request.session.items}
    assert tiers and not {nodeid: t for nodeid, t in tiers.items() if len(t) != 1}


def test_a_quick_test_that_starts_a_python_interpreter_fails_with_the_fix():
    with pytest.raises(AssertionError, match=r'starts a Python interpreter .* but is in the quick tier: mark it .*slow'):
        subprocess.run([sys.executable, '-c', 'pass'])
    with pytest.raises(AssertionError, match='quick tier'):
        subprocess.run('python3 -c pass', shell=True)
    assert subprocess.run(['true']).returncode == 0  # other programs are fine
