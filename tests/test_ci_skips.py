"""Under CI a skipped test fails the run (tests/conftest.py), with the list.

Runs pytest itself (pytester, in a subprocess) on tiny test files, with this
repository's conftest.py copied next to them.
"""

import pathlib

import pytest

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")

TESTS = {
    "test_tiny": """
import pytest

def test_passes():
  pass

@pytest.mark.skipif(True, reason="pip install --no-deps some-data-package")
def test_skipped_by_mark():
  pass

def test_skipped_inside():
  pytest.skip("no such thing here")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
  assert False
""",
    "test_module_skipped": """
import pytest

pytest.importorskip("no_such_module_kdjax_ci", reason="not installed")

def test_never_runs():
  pass
""",
}


def _run(pytester, monkeypatch, ci):
  pytester.makeconftest(CONFTEST.read_text())
  pytester.makepyfile(**TESTS)
  if ci is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", ci)
  return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")


def test_a_skip_fails_the_run_under_ci(pytester, monkeypatch):
  result = _run(pytester, monkeypatch, "1")
  result.assert_outcomes(passed=1, skipped=3, xfailed=1)
  assert result.ret == pytest.ExitCode.TESTS_FAILED
  result.stdout.fnmatch_lines([
      "*skipped under CI: the run fails*",
      "test_module_skipped.py: not installed",
      "test_tiny.py::test_skipped_by_mark: "
      "pip install --no-deps some-data-package",
      "test_tiny.py::test_skipped_inside: no such thing here",
      "3 test(s) skipped with CI set*",
  ])
  assert "test_expected_failure" not in result.stdout.str()  # xfail: no hole.


@pytest.mark.parametrize("ci", [None, "false"])
def test_skips_are_fine_outside_ci(pytester, monkeypatch, ci):
  result = _run(pytester, monkeypatch, ci)
  result.assert_outcomes(passed=1, skipped=3, xfailed=1)
  assert result.ret == pytest.ExitCode.OK
  assert "skipped under CI" not in result.stdout.str()
