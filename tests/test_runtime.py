"""Thread policy (deltatune/runtime.py), CJK word tokens (deltatune/text.py), 'did you mean' (suggest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deltatune.runtime import available_cores, plan_threads, prefer_passive_waiting
from deltatune.suggest import did_you_mean
from deltatune.text import word_count, words
from deltatune.train.evaluate import rouge_l


def test_thread_count_comes_from_flag_then_environment_then_cores():
    assert plan_threads(3, current=2, environ={}, cores=8).threads == 3
    plan = plan_threads(None, current=5, environ={"OMP_NUM_THREADS": "5"}, cores=8)
    assert (plan.threads, plan.source) == (5, "OMP_NUM_THREADS")
    assert plan_threads(None, current=16, environ={}, cores=4).threads == 4  # capped at what we may use
    lowered = plan_threads(None, current=1, environ={}, cores=4)  # a caller lowered it: never raised
    assert (lowered.threads, lowered.source) == (1, "set in this process")
    with pytest.raises(Exception, match="--threads must be >= 1"):
        plan_threads(0, current=1, environ={}, cores=4)


def test_wait_policy_is_reported_with_who_chose_it():
    assert plan_threads(None, current=2, environ={}, cores=2).wait_policy == "default"
    mine = plan_threads(None, current=2, environ={"OMP_WAIT_POLICY": "PASSIVE", "_DELTATUNE_SET_OMP_WAIT_POLICY": "1"},
                        cores=2)  # fmt: skip
    assert "PASSIVE (deltatune default)" in mine.describe()
    theirs = plan_threads(None, current=2, environ={"OMP_WAIT_POLICY": "active"}, cores=2)
    assert "ACTIVE (environment)" in theirs.describe()


def test_available_cores_honours_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert available_cores(quota) == affinity
    quota.write_text("50000 100000\n")  # half a core: still one thread
    assert available_cores(quota) == 1
    assert available_cores(tmp_path / "missing") == affinity


def test_passive_waiting_only_when_unset_and_before_torch(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prefer_passive_waiting()  # torch is already imported here: too late, so nothing is set
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_passive_waiting()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("_DELTATUNE_SET_OMP_WAIT_POLICY", raising=False)
    prefer_passive_waiting()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_importing_deltatune_sets_passive_before_openmp_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "_DELTATUNE_SET_OMP_WAIT_POLICY")}
    code = "import os, deltatune, torch; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "PASSIVE", done.stderr


def test_cjk_text_is_tokenized_by_character():
    assert words("我喜欢Python 3!") == ["我", "喜", "欢", "python", "3"]
    assert word_count("你好") == 2 and word_count("hello") == 1
    assert rouge_l("我很好，谢谢", "我很好") == pytest.approx(2 * 1.0 * 0.6 / 1.6)  # LCS 3 of 5 and of 3
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)  # unchanged


def test_did_you_mean():
    assert did_you_mean("chaterbot-en", ["chatterbot-en", "digits"]) == "did you mean 'chatterbot-en'? "
    assert did_you_mean("zzz", ["chatterbot-en"]) == ""
