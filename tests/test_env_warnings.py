"""MuJoCo's warnings, printed by MuJoCo at every model compile, reach users as one ``MujocoWarning`` each."""

import subprocess
import sys

# A model MuJoCo 4 compiles with a deprecation warning (gymnasium's HalfCheetah-v5 has the same attribute).
_WARNS = (
    '<mujoco><compiler settotalmass="1"/><worldbody><body><freejoint/><geom size=".1"/></body></worldbody></mujoco>'
)


def _run(before: str = "", after: str = "", end: str = "") -> subprocess.CompletedProcess:
    code = f"""
import warnings, mujoco
from qmpc.env import make_env
{before}
make_env("InvertedPendulum-v5")
{after}
for _ in range(3):
    mujoco.MjModel.from_xml_string({_WARNS!r})
{end}
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_mujoco_warning_is_a_python_warning_shown_once():
    r = _run()
    assert r.returncode == 0, r.stderr
    assert "settotalmass" not in r.stdout
    assert r.stderr.count("MujocoWarning: MuJoCo: compiler attribute 'settotalmass'") == 1, r.stderr


def test_mujoco_warnings_can_be_silenced_and_an_error_filter_does_not_abort():
    quiet = _run(after="warnings.filterwarnings('ignore', category=__import__('qmpc').MujocoWarning)")
    assert quiet.returncode == 0 and "settotalmass" not in quiet.stdout + quiet.stderr, quiet.stderr
    # an exception cannot cross MuJoCo's C callback (it would abort): each warning is then written as MuJoCo would
    loud = _run(after="warnings.simplefilter('error')")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("WARNING: compiler attribute 'settotalmass'") == 3, loud.stderr


def test_a_warning_handler_installed_before_is_kept():
    r = _run(before="seen = []\nmujoco.set_mju_user_warning(seen.append)", end="print(len(seen), seen[0])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 compiler attribute 'settotalmass'"), r.stdout
    assert "MujocoWarning" not in r.stderr
