"""The split into fast and slow tests (conftest.slow_reasons): what makes a test slow is found in the test's code
and in the test helpers it calls, not in the project's code."""
import subprocess
import sys

from conftest import run_script, slow_reasons


def starts_python():
    return subprocess.run([sys.executable, '-c', 'pass'], check=True)


def calls_a_helper_that_starts_python():
    return starts_python()


def trains(train):
    train.main(['-ex', 'x'])


def fits(trainer):
    trainer.fit()


def runs_a_script_in_this_process(tmp_path):
    return run_script('train.py', ['--help'], cwd=tmp_path)


# Reached through a dict, so that the tests below do not call them and stay fast themselves.
SAMPLES = {'process': starts_python, 'process via a helper': calls_a_helper_that_starts_python, 'runs train': trains,
           'fit': fits, 'in this process': runs_a_script_in_this_process, 'not a test helper': subprocess.run}


def test_processes_and_trainings_are_found_through_helpers():
    assert slow_reasons(SAMPLES['process']) == {'starts a process'}
    assert slow_reasons(SAMPLES['process via a helper']) == {'starts a process'}
    assert slow_reasons(SAMPLES['runs train']) == slow_reasons(SAMPLES['fit']) == {'trains'}


def test_in_process_work_and_code_outside_the_tests_are_not_slow():
    assert slow_reasons(SAMPLES['in this process']) == set()
    assert slow_reasons(SAMPLES['not a test helper']) == set()


def test_the_collected_tests_that_start_processes_are_marked_slow(request):
    """Whatever -m selected, every collected test that starts a process or trains carries the mark."""
    assert request.session.items
    for item in request.session.items:
        assert bool(slow_reasons(item.function)) <= (item.get_closest_marker('slow') is not None), item.nodeid
